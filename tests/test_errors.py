"""Bad input: whole messages, and the running statistics left as they were."""

import re

import pytest
import torch

import batchnorm
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
            "use eval mode (model.eval()), a batch with more than one value per channel, or a normalization "
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
        (batchnorm.BatchNorm(3), torch.randn(2, 3, 4, 5, 6, 7), "expected 2D to 5D input (got 6D input)"),
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
        (dict(num_features=3, eps=0.0), "eps must be positive, got eps=0.0"),
        (dict(num_features=3, eps=-1e-5), "eps must be positive, got eps=-1e-05"),
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
    with pytest.raises(ValueError, match=r"^running_mean should contain 3 elements not 4$"):
        F.batch_norm(x, torch.zeros(4), rv, training=True)
    with pytest.raises(ValueError, match=r"^weight should contain 3 elements not 2$"):
        F.batch_norm(x, rm, rv, torch.ones(2), training=True)
    with pytest.raises(ValueError, match=r"^running_mean and running_var are needed when training=False$"):
        F.batch_norm(x, None, None)
    with pytest.raises(ValueError, match=r"^momentum=None \(cumulative average\) needs num_batches_tracked$"):
        F.batch_norm(x, rm, rv, training=True, momentum=None)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    # training without running buffers: batch statistics only
    y = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
