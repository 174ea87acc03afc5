"""Gradient accumulation without k running updates: ``batchnorm.accumulate(model, steps=k)``.

With k micro-batches per optimizer step, torch's layer updates its running statistics k
times, each with ``momentum``, which is not what one batch of k*m values would give
(pytorch#46516). Inside ``with batchnorm.accumulate(model, steps=k):`` each of this
project's batch-norm layers in training still normalizes every micro-batch with that
micro-batch's own statistics (the forward and the gradients do not change), but its running
statistics are updated once per k micro-batches, from their merged moments (Chan, Golub and
LeVeque's merge in float64, stats.ExactEstimator): the mean and biased variance of the k
micro-batches together, over their total count, which is one update from the concatenated
batch. num_batches_tracked grows by one per update.

Each layer counts its own training calls: a layer called twice in one forward counts two
micro-batches. Micro-batches left over when the block ends (fewer than k) are merged into one
last update then. A non-finite micro-batch makes its group's merged moments non-finite, and
that group updates nothing. Layers in eval mode, or without running statistics, and the
variants with a running update of their own (ghost, renorm) are as outside the block; torch's
layers are refused (convert the model first). The merged moments cost one more pass over each micro-batch.
"""

from __future__ import annotations

import contextlib

from torch import nn

from . import functional as F
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .layers import _BatchNorm
from .renorm import _Renorm
from .stats import ExactEstimator

# variants with a running update of their own, which the block leaves as they are
_OWN_UPDATE = (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, _Renorm)

__all__ = ["accumulate"]


class _Accumulator:
    """One layer's micro-batch moments until ``steps`` of them make an update."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.seen = 0
        self.moments = ExactEstimator()

    def observe(self, layer: _BatchNorm, input, mask=None) -> None:
        mean, var = F.batch_statistics(input, layer.axis, mask)
        count = input.numel() // input.shape[layer.axis] if mask is None else int(mask.sum())
        self.moments.update(mean, var, count)
        self.seen += 1
        if self.seen == self.steps:
            self.flush(layer)

    def flush(self, layer: _BatchNorm) -> None:
        if self.seen:
            moments = self.moments
            dtype = layer.running_mean.dtype
            mean, var = moments.mean.to(dtype), (moments.sum_sq / moments.count).to(dtype)
            F.update_running_stats(
                layer.running_mean, layer.running_var, layer.num_batches_tracked, mean, var, moments.count,
                layer.momentum, layer.running_var_correction,
            )  # fmt: skip
        self.seen, self.moments = 0, ExactEstimator()


@contextlib.contextmanager
def accumulate(model: nn.Module, steps: int):
    """Within the block, the running statistics of ``model``'s batch-norm layers are updated
    once per ``steps`` micro-batches from their merged moments (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}")
    foreign = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if foreign:
        raise ValueError(
            f"accumulate takes this project's batch-norm layers; torch's are at {', '.join(foreign)}: "
            "convert the model with batchnorm.convert first"
        )
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and not isinstance(m, _OWN_UPDATE)
    ]
    busy = [m for m in layers if m.__dict__.get("_accumulator") is not None]
    if busy:
        raise RuntimeError("accumulate blocks cannot nest over the same layers")
    for layer in layers:
        layer.__dict__["_accumulator"] = _Accumulator(steps)
    try:
        yield
    finally:
        for layer in layers:
            accumulator = layer.__dict__.pop("_accumulator")
            accumulator.flush(layer)
