"""One rule for the dtypes of the input and the per-channel tensors, and for running buffers
that require grad, on every path (small input on torch's kernel, the one-call small path,
the Numba kernels, both layouts, train and eval): torch's rule, checked against torch's
layer given the same module state."""

import pytest
import torch

import batchnorm
import routing

SHAPES = [(16, 4), (64, 4, 32, 32)]  # below the small-input threshold, and above it (the kernels)


@pytest.fixture(autouse=True)
def _routing(monkeypatch):
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", routing.TABLE)  # conftest sets 0; keep both routes


def _inputs(shape, dtype):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    yield "contiguous", x
    yield "transposed", x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)


def _pair(module_dtype, training):
    ours, theirs = batchnorm.BatchNorm(4).to(module_dtype), torch.nn.BatchNorm1d(4).to(module_dtype)
    return ours.train(training), theirs.train(training)


def _outcome(module, x):
    try:
        return module(x)
    except RuntimeError as error:
        return error


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=["small", "kernels"])
@pytest.mark.parametrize(
    "module_dtype, input_dtype, allowed",
    [
        (torch.float64, torch.float32, False),
        (torch.float32, torch.float64, False),
        (torch.float32, torch.bfloat16, True),  # float32 parameters with half input: torch's mixed case
        (torch.float32, torch.float16, True),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.float16, torch.float32, False),
    ],
)
def test_dtype_rule_is_torchs_on_every_path(module_dtype, input_dtype, allowed, shape, training):
    for layout, x in _inputs(shape, input_dtype):
        ours, theirs = _pair(module_dtype, training)
        # BatchNorm1d takes rank 2 or 3; torch's functional form with the module's tensors for 4D
        theirs_call = theirs if x.dim() <= 3 else (
            lambda x, t=theirs: torch.nn.functional.batch_norm(
                x, t.running_mean, t.running_var, t.weight, t.bias, t.training, t.momentum, t.eps
            )
        )  # fmt: skip
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        mine, torchs = _outcome(ours, x), _outcome(theirs_call, x)
        assert isinstance(torchs, torch.Tensor) == allowed, (layout, torchs)  # the control: torch's rule
        if allowed:
            assert isinstance(mine, torch.Tensor), (layout, mine)
            assert mine.dtype == torchs.dtype
            torch.testing.assert_close(mine.double(), torchs.double(), rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(ours.running_mean.double(), theirs.running_mean.double(), rtol=2e-2, atol=2e-3)
        else:
            assert isinstance(mine, RuntimeError), (layout, mine)
            assert str(mine).startswith("mixed dtype"), str(mine)
            for key, value in ours.state_dict().items():
                assert torch.equal(value, state[key]), (layout, key)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=["small", "kernels"])
def test_running_buffers_requiring_grad_follow_torch(shape, training, grad_mode):
    """torch refuses running buffers that require grad while autograd records, in train and
    eval, and takes them under no_grad; so here, whatever the size."""
    x = torch.randn(shape)
    ours, theirs = _pair(torch.float32, training)
    for module in (ours, theirs):
        module.running_mean.requires_grad_(True)
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    with torch.set_grad_enabled(grad_mode):
        mine = _outcome(ours, x)
        torchs = _outcome(
            lambda x, t=theirs: torch.nn.functional.batch_norm(
                x, t.running_mean, t.running_var, t.weight, t.bias, t.training, t.momentum, t.eps
            ),
            x,
        )
    assert isinstance(torchs, RuntimeError) == grad_mode  # the control
    if grad_mode:
        assert isinstance(mine, RuntimeError) and "not differentiable with respect to argument 'running_mean'" in str(
            mine
        ), mine
        for key, value in ours.state_dict().items():
            assert torch.equal(value, state[key]), key
    else:
        torch.testing.assert_close(mine, torchs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
