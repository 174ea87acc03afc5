"""Batch norm with training statistics the kernels do not compute, in torch ops: a mask (Keras
3's and Flax's), or an lp spread (Santurkar et al. 2018, section 3.3).

Training, per channel c, with w = mask (True: the position counts; all True without one) and
m = sum(w), by kernels/reference.py's ``moments``::

    mu  = sum(w x) / m
    s^2 = sum(w (x - mu)^2) / m         p = 2: the biased var (batch norm's)
    s^2 = (sum(w |x - mu|) / m)^2       p = 1: the mean absolute deviation, squared
    s^2 = max over w of |x - mu|^2      p = inf: the largest deviation, squared
    y   = weight * (x - mu) / sqrt(s^2 + eps) + bias          at every position
    running_mean, running_var: the plain layer's update with mu, s^2 and m (s^2 * m/(m - 1)
    for p = 2 with torch's correction; s^2 itself for p = 1 and inf)

Every position is normalized with those statistics, the masked ones too (Keras and Flax do
the same): their outputs are defined, finite and unused by the statistics, so padding may hold
anything finite; a masked position's gradient is weight * invstd * dy, with no share in the
statistics' gradients. In evaluation the mask changes nothing, and every p is BatchNorm's
evaluation: running_var holds the running s^2.

The map is reference.normalize, on any device, differentiable; the running update is the
plain layer's op. The count m is read on the host, so under torch.compile such a training call
breaks the graph there.
"""

from __future__ import annotations

import math

import torch

from . import epilogue as epilogues
from . import ops
from .kernels import reference

Tensor = torch.Tensor

# the lp batch norms' names (LpBatchNorm's ``norm``) and their p
NORMS = {"l1": 1, "l2": 2, "linf": math.inf}


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


def normalize(
    input: Tensor, mask: Tensor | None, weight, bias, eps: float, axis: int, running, epilogue=None, p: float = 2
) -> Tensor:
    """Training of checked arguments (functional.normalize; ``mask`` from check_mask or None),
    statistics as the module docstring says; ``running`` as route.normalize takes it, or None."""
    count = input.numel() // input.shape[axis] if mask is None else int(mask.sum())
    if count < 2:
        where = "" if mask is None else f" (mask of shape {tuple(mask.shape)}); unmask more positions,"
        raise ValueError(
            f"Expected more than 1 {'unmasked ' if mask is not None else ''}value per channel when training, "
            f"got {count}{where} or use eval mode"
        )
    mean, spread = reference.batch_stats(input, axis, mask, p)
    invstd = torch.rsqrt(spread + eps)
    y = reference.normalize(input, mean, invstd, weight, bias, axis)
    if running is not None:
        running_mean, running_var, num_batches_tracked, _count, momentum, correction = running
        dtype = running_mean.dtype
        with torch.no_grad():
            ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.detach().to(dtype), spread.detach().to(dtype),
                count, momentum, correction if p == 2 else 0,
            )  # fmt: skip
    return y if epilogue is None else epilogues.apply(y, epilogue)
