"""Masked batch normalization (Keras 3's and Flax's ``mask``): statistics over the unmasked
positions only, as for padded sequences, (N, C, L) data with an (N, L) mask.

Training, per channel c, with w = mask (True: the position counts) and m = sum(w)::

    mu  = sum(w x) / m          var = sum(w (x - mu)^2) / m          (biased)
    y   = weight * (x - mu) / sqrt(var + eps) + bias                  at every position
    running_mean, running_var: the plain layer's update with this mu, var and m

Every position is normalized with those statistics, the masked ones too (Keras and Flax do
the same): their outputs are defined, finite and unused by the statistics, so padding may
hold anything finite; a masked position's gradient is weight * invstd * dy, with no share
in the statistics' gradients. In evaluation the mask changes nothing (the running
statistics normalize every position).

The statistics are kernels/reference.py's (the shared batch_stats, with its mask) and the
map its normalize, in torch ops on any device, differentiable; the running update is the
plain layer's (functional.update_running_stats). The count m is read on the host, so under
torch.compile a masked training call breaks the graph there.
"""

from __future__ import annotations

import torch

from . import epilogue as epilogues
from . import ops
from .kernels import reference

Tensor = torch.Tensor


def check_mask(mask: Tensor, input: Tensor, axis: int) -> Tensor:
    """``mask`` expanded to ``input``'s shape without the channel axis; a boolean tensor on
    the input's device whose shape broadcasts to that one, else a ValueError naming it."""
    expected = tuple(s for d, s in enumerate(input.shape) if d != axis)
    if not isinstance(mask, Tensor) or mask.dtype is not torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a torch.bool tensor, got {kind}")
    try:
        fits = torch.broadcast_shapes(tuple(mask.shape), expected) == expected
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask must have the input's shape without its channel axis {axis}, {expected} (or one that "
            f"broadcasts to it), got mask of shape {tuple(mask.shape)} for input of size {tuple(input.shape)}"
        )
    if mask.device != input.device:
        raise ValueError(f"mask must be on the input's device {input.device}, got {mask.device}")
    return mask.expand(expected)


def normalize(input: Tensor, mask: Tensor, weight, bias, eps: float, axis: int, running, epilogue=None) -> Tensor:
    """Masked training of checked arguments (functional.normalize, with ``mask`` from check_mask);
    ``running`` as route.normalize takes it, or None for no update."""
    count = int(mask.sum())
    if count < 2:
        raise ValueError(
            f"Expected more than 1 unmasked value per channel when training, got {count} "
            f"(mask of shape {tuple(mask.shape)}); unmask more positions, or use eval mode"
        )
    mean, var = reference.batch_stats(input, axis, mask)
    invstd = torch.rsqrt(var + eps)
    y = reference.normalize(input, mean, invstd, weight, bias, axis)
    if running is not None:
        running_mean, running_var, num_batches_tracked, _count, momentum, correction = running
        dtype = running_mean.dtype
        with torch.no_grad():
            ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.detach().to(dtype), var.detach().to(dtype),
                count, momentum, correction,
            )  # fmt: skip
    return y if epilogue is None else epilogues.apply(y, epilogue)
