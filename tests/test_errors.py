"""Bad input: whole messages, and the running statistics left as they were."""

import re

import pytest
import torch

import batchnorm
import routing
from batchnorm import functional as F


def _trained():
    module = batchnorm.BatchNorm2d(3)
    module(torch.randn(4, 3, 2, 2) + 1)
    return module, {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, state):
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    "make_input,error,message",
    [
        (lambda: torch.randn(3, 2, 2), ValueError, "expected 4D input (got 3D input)"),
        (
            lambda: torch.randn(2, 4, 2, 2),
            ValueError,
            "BatchNorm2d(num_features=3) expected input with 3 channels on axis 1, got 4 (input size (2, 4, 2, 2))",
        ),
        (
            lambda: torch.randn(1, 3, 1, 1),
            ValueError,
            "Expected more than 1 value per channel when training, got input size torch.Size([1, 3, 1, 1]); "
            "use eval mode (model.eval()), a batch with more than one value per channel, a layer built with "
            "single_value='use_running' (the running statistics for such a batch), or a normalization "
            "that does not depend on the batch (LayerNorm, GroupNorm)",
        ),
        (
            lambda: torch.ones(2, 3, 2, 2, dtype=torch.int64),
            TypeError,
            "input must have a floating-point dtype (float16, bfloat16, float32 or float64), "
            "got input.dtype=torch.int64",
        ),
        (
            lambda: torch.ones(2, 3, 2, 2, dtype=torch.complex64),
            TypeError,
            "input must have a floating-point dtype (float16, bfloat16, float32 or float64), "
            "got input.dtype=torch.complex64",
        ),
    ],
)
def test_bad_input_to_module(make_input, error, message):
    module, state = _trained()
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        module(make_input())
    _unchanged(module, state)


def test_rank_messages_as_torch():
    for module, x, message in [
        (batchnorm.BatchNorm1d(3), torch.randn(2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (batchnorm.BatchNorm3d(3), torch.randn(2, 3, 4, 5), "expected 5D input (got 4D input)"),
        (batchnorm.BatchNorm(3), torch.randn(3), "expected at least 2D input (got 1D input)"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            module(x)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_features=0), "num_features must be a positive integer, got num_features=0"),
        (dict(num_features=-2), "num_features must be a positive integer, got num_features=-2"),
        (dict(num_features=3, momentum=1.5), "momentum must be in [0, 1] or None, got momentum=1.5"),
        (dict(num_features=3, momentum=-0.1), "momentum must be in [0, 1] or None, got momentum=-0.1"),
        (dict(num_features=3, axis=7), "axis must be an integer in [-5, 4], got axis=7"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        batchnorm.BatchNorm(**kwargs)


def test_axis_out_of_range_for_input():
    module = batchnorm.BatchNorm(3, axis=3)
    with pytest.raises(ValueError, match=re.escape("axis must be in [-3, 2] for 3D input, got axis=3")):
        module(torch.randn(2, 3, 3))


def test_functional_checks():
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    # torch's exception types and words, checked against torch's own function
    for batch_norm in (F.batch_norm, torch.nn.functional.batch_norm):
        with pytest.raises(RuntimeError, match=r"^running_mean should contain 3 elements not 4$"):
            batch_norm(x, torch.zeros(4), rv, training=True)
        with pytest.raises(RuntimeError, match=r"^weight should contain 3 elements not 2$"):
            batch_norm(x, rm, rv, torch.ones(2), training=True)
        with pytest.raises(RuntimeError, match=r"^running_mean must be defined in evaluation mode"):
            batch_norm(x, None, None)
        with pytest.raises(ValueError, match=r"^running_mean and running_var must either both be None or neither"):
            batch_norm(x, rm, None, training=True)
        with pytest.raises(ValueError, match=r"^batch_norm eps must be positive during training, but got 0.0$"):
            batch_norm(x, rm, rv, training=True, eps=0.0)
        with pytest.raises(ValueError, match=r"^batch_norm eps must be non-negative, but got -1.0$"):
            batch_norm(x, rm, rv, training=False, eps=-1.0)
    # eps=0 is allowed in eval, as torch allows it
    torch.testing.assert_close(F.batch_norm(x, rm, rv, eps=0.0), torch.nn.functional.batch_norm(x, rm, rv, eps=0.0))
    with pytest.raises(ValueError, match=r"^momentum=None \(cumulative average\) needs num_batches_tracked$"):
        F.batch_norm(x, rm, rv, training=True, momentum=None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    # training without running buffers: batch statistics only
    y = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(60, 3), (4, 3, 40, 40)], ids=["small", "kernels"])
def test_per_channel_tensor_on_another_device(name, training, shape, monkeypatch):
    """A parameter or buffer on another device than the input is refused, as torch's layer
    refuses it, by name (the meta device stands in for a GPU), whether the input is small
    (torch's kernel) or not; the CPU's state is left as it was."""
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", routing.TABLE)
    module = batchnorm.BatchNorm(3)
    module(torch.randn(shape) + 1)
    module.train(training)
    tensor = getattr(module, name)
    moved = tensor.to("meta")
    setattr(module, name, torch.nn.Parameter(moved) if isinstance(tensor, torch.nn.Parameter) else moved)
    state = {k: v.clone() for k, v in module.state_dict().items() if v.device.type == "cpu"}
    with pytest.raises(RuntimeError, match=f"^{name} is on device meta, not on the input's device cpu$"):
        module(torch.randn(shape))
    for key, value in state.items():
        assert torch.equal(module.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="is not on the expected device cpu"):
        theirs = torch.nn.BatchNorm1d(3).train(training)
        setattr(theirs, name, torch.nn.Parameter(moved) if isinstance(tensor, torch.nn.Parameter) else moved)
        theirs(torch.randn(60, 3))


@pytest.mark.parametrize("shape", [(60, 3), (4, 3, 40, 40)], ids=["small", "kernels"])
def test_counter_on_another_device(shape, monkeypatch):
    """num_batches_tracked too (torch's layer adds 1 to it wherever it is, then normalizes)."""
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", routing.TABLE)
    module = batchnorm.BatchNorm(3)
    module.num_batches_tracked = module.num_batches_tracked.to("meta")
    with pytest.raises(RuntimeError, match="^num_batches_tracked is on device meta, not on the input's device cpu$"):
        module(torch.randn(shape))
    assert torch.equal(module.running_mean, torch.zeros(3)) and torch.equal(module.running_var, torch.ones(3))
    module.eval()(torch.randn(shape))  # evaluation does not read it


def test_single_value_use_running_normalizes_a_batch_of_one_with_the_running_statistics():
    """A training batch of one value per channel: torch raises (the default here too); with
    single_value='use_running' it is normalized as in eval, and nothing is updated."""
    layer = batchnorm.BatchNorm1d(3, single_value="use_running")
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        layer.weight.copy_(torch.tensor([2.0, 1.0, 0.5]))
    x = torch.tensor([[3.0, 0.0, 1.5]])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    expected = layer.weight * (x - layer.running_mean) / torch.sqrt(layer.running_var + 1e-5)
    torch.testing.assert_close(y, expected.detach())
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert layer.training and "single_value='use_running'" in repr(layer)
    layer(torch.randn(4, 3))  # a real batch: batch statistics and an update, as always
    assert layer.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match=re.escape("single_value='use_running' (the running statistics")):
        batchnorm.BatchNorm1d(3)(x)
    with pytest.raises(
        ValueError, match=re.escape("single_value must be 'raise' or 'use_running', got single_value='skip'")
    ):
        batchnorm.BatchNorm1d(3, single_value="skip")
    assert batchnorm.BatchNorm(3, axis=-1, single_value="use_running")(torch.randn(1, 3)).shape == (1, 3)
