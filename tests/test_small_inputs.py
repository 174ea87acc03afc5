"""Small inputs go to torch's CPU kernel in eager mode; the semantics stay this project's."""

import pytest
import torch

import batchnorm
from batchnorm import ops

import oracle


@pytest.fixture(autouse=True)
def _default_threshold(monkeypatch):
    monkeypatch.setattr(ops, "SMALL_INPUT", 1 << 18)


@pytest.mark.parametrize("shape", [(256, 1024), (128, 16, 40), (4, 16, 5, 5)])
def test_small_inputs_match_oracle_and_torch(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    assert ops._small(x, 1)
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
