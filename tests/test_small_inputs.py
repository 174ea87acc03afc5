"""Small inputs go to torch's CPU kernel or to the one-thread kernels in eager mode;
the semantics stay this project's."""

import pytest
import torch

import batchnorm
from batchnorm import ops

import oracle


@pytest.fixture(autouse=True)
def _default_threshold(monkeypatch):
    monkeypatch.setattr(ops, "SMALL_INPUT", 1 << 18)
    monkeypatch.setattr(ops, "SMALL_CHANNEL_MAJOR", (1, 1 << 17))  # every size, down to one value


@pytest.mark.parametrize("shape", [(256, 1024), (128, 16, 40), (4, 16, 5, 5)])
def test_small_inputs_match_oracle_and_torch(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    assert ops._small(x, 1)
    assert (ops._small_shape(x, None, None, 1) is None) == (len(shape) == 2)
    ours = batchnorm.BatchNorm(shape[1], momentum=None).double()
    theirs = (
        torch.nn.BatchNorm1d(shape[1], momentum=None).double()
        if len(shape) < 4
        else torch.nn.BatchNorm2d(shape[1], momentum=None).double()
    )
    for step in range(3):
        xs = x * (step + 1)
        a, b = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        ya, yb = ours(a), theirs(b)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        y_ref, _, _ = oracle.train_forward(xs, None, None)
        torch.testing.assert_close(ya, y_ref)
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-9, atol=1e-12)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 3
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_small_input_nan_batch_still_skipped():
    module = batchnorm.BatchNorm1d(4)
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        module(x)
    assert torch.equal(module.running_mean, torch.zeros(4)) and module.num_batches_tracked.item() == 0


def test_small_input_float32_running_stats_match_torch():
    """float32: the variance comes back from torch's 1/sqrt(var + eps) inside the update kernel."""
    ours, theirs = batchnorm.BatchNorm1d(16), torch.nn.BatchNorm1d(16)
    for step in range(4):
        x = torch.randn(128, 16, 40) * (step + 1) + step
        assert ops._small(x, 1)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(128, 16, 40), (4, 16, 5, 5), (2, 3, 4, 5, 6), (7, 2, 3)])
def test_one_thread_kernels_three_ways(shape, affine, dtype):
    """The one-thread kernels (contiguous, B > 1) against torch and the float64 oracle:
    output, the three gradients, running statistics and num_batches_tracked."""
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    ours = batchnorm.BatchNorm(shape[1], affine=affine).to(dtype)
    theirs = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)](
        shape[1], affine=affine
    ).to(dtype)
    if affine:
        with torch.no_grad():
            for module in (ours, theirs):
                module.weight.copy_(torch.linspace(0.5, 2, shape[1]))
                module.bias.copy_(torch.linspace(-1, 1, shape[1]))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    for step in range(3):
        xs = (x * (step + 1)).to(dtype)
        if step == 0:
            assert ops._small_shape(xs, ours.weight, ours.bias, 1) is not None
        a, b = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        ya, yb = ours(a), theirs(b)
        dy = torch.randn(shape, dtype=dtype)
        ya.backward(dy)
        yb.backward(dy)
        y_ref, _, _ = oracle.train_forward(xs, ours.weight, ours.bias)
        dx_ref, dw_ref, db_ref = oracle.train_backward(dy, xs, ours.weight)
        torch.testing.assert_close(ya.double(), y_ref, **tol)
        torch.testing.assert_close(a.grad.double(), dx_ref, **tol)
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(a.grad, b.grad, **tol)
        if affine:
            torch.testing.assert_close(ours.weight.grad.double(), dw_ref, **tol)
            torch.testing.assert_close(ours.bias.grad.double(), db_ref, **tol)
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
            for module in (ours, theirs):
                module.weight.grad = module.bias.grad = None
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


def test_one_thread_kernels_gradcheck_and_large_offset():
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert ops._small_shape(x, weight, bias, 1) is not None

    def fn(x, weight, bias):
        return batchnorm.functional.batch_norm(x, None, None, weight, bias, training=True)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))
    # mean 1e4, standard deviation 1, in float32: the shifted float64 sums keep the variance
    big = (torch.randn(64, 3, 16, dtype=torch.float64) + 1e4).float()
    module = batchnorm.BatchNorm1d(3, momentum=1.0)
    module(big)
    _, _, var = oracle.train_forward(big, None, None)
    m = big.numel() // 3
    torch.testing.assert_close(module.running_var.double(), var * m / (m - 1), rtol=1e-3, atol=0)


def test_one_thread_kernels_nan_batch_skipped_and_no_input_grad():
    module = batchnorm.BatchNorm1d(4)
    x = torch.randn(8, 4, 6)
    x[0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="^batch norm: the training batch has NaN"):
        module(x)
    assert torch.equal(module.running_mean, torch.zeros(4)) and module.num_batches_tracked.item() == 0
    # weight and bias want gradients, the input does not: dx is skipped
    x = torch.randn(8, 4, 6)
    module(x).sum().backward()
    torch.testing.assert_close(module.bias.grad, torch.full((4,), 48.0))
    assert module.weight.grad.abs().max() < 1e-4
