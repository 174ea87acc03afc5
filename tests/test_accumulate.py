"""batchnorm.accumulate (accumulate.py): k micro-batches update the running statistics once,
as one batch of their concatenation would (pytorch#46516); the forward and the gradients are
each micro-batch's own."""

import re

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import crossover


@pytest.fixture(params=["torch", "kernels"])
def destination(request, monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1 if request.param == "torch" else 0)
    return request.param


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, 3, generator=g, dtype=torch.float64) * (k + 1) + 3 * k for k, n in enumerate(sizes)]


def _assert_same_statistics(ours, theirs):
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-12)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_k_micro_batches_update_once_as_their_concatenation(momentum, destination):
    layer, whole, alone = (batchnorm.BatchNorm1d(6, momentum=momentum).double() for _ in range(3))
    batches = _batches([8, 5, 11])
    with batchnorm.accumulate(layer, steps=3):
        outputs = [layer(x) for x in batches]
    whole(torch.cat(batches))
    _assert_same_statistics(layer, whole)
    assert layer.num_batches_tracked.item() == 1
    for x, y in zip(batches, outputs, strict=True):  # each normalized with its own statistics
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    alone(batches[0])  # outside the block: torch's behaviour, an update a call
    assert alone.num_batches_tracked.item() == 1 and not torch.equal(alone.running_mean, layer.running_mean)


def test_groups_and_the_remainder_at_the_end_of_the_block(destination):
    layer, reference = batchnorm.BatchNorm1d(6).double(), batchnorm.BatchNorm1d(6).double()
    batches = _batches([4, 4, 4, 4, 4])
    with batchnorm.accumulate(layer, steps=2):
        for x in batches:
            layer(x)
    for group in (batches[0:2], batches[2:4], batches[4:]):  # two full groups, then the one left
        reference(torch.cat(group))
    _assert_same_statistics(layer, reference)
    assert layer.num_batches_tracked.item() == 3


def test_gradients_are_the_micro_batchs_own():
    model = nn.Sequential(nn.Linear(6, 6), batchnorm.BatchNorm1d(6)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    grads = []
    for inside in (True, False):
        model.zero_grad()
        context = batchnorm.accumulate(model, steps=4) if inside else torch.enable_grad()
        with context:
            model(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_nonfinite_micro_batch_skips_its_group():
    layer = batchnorm.BatchNorm1d(6).double()
    batches = _batches([4, 4])
    batches[1][0, 2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        with batchnorm.accumulate(layer, steps=2):
            for x in batches:
                layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(layer.running_var, torch.ones(6, dtype=torch.float64))
    assert layer.num_batches_tracked.item() == 0


def test_what_the_block_leaves_alone_and_refuses():
    ghost = batchnorm.GhostBatchNorm1d(6, virtual_batch_size=2).double()
    with batchnorm.accumulate(nn.Sequential(ghost), steps=3):
        ghost(torch.randn(4, 6, dtype=torch.float64))
    assert ghost.num_batches_tracked.item() == 1  # its own update, as outside the block
    with pytest.raises(
        ValueError, match=re.escape("accumulate takes this project's batch-norm layers; torch's are at 1")
    ):
        with batchnorm.accumulate(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), steps=2):
            pass
    with pytest.raises(ValueError, match=re.escape("steps must be a positive integer, got steps=0")):
        with batchnorm.accumulate(ghost, steps=0):
            pass
    layer = batchnorm.BatchNorm1d(6)
    with batchnorm.accumulate(layer, steps=2):
        with pytest.raises(RuntimeError, match="cannot nest"):
            with batchnorm.accumulate(layer, steps=2):
                pass
    assert "_accumulator" not in layer.__dict__
