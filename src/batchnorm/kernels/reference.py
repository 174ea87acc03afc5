"""Batch normalization in plain torch ops, for every device the Numba kernels do not serve.

The same semantics as the CPU kernels: statistics accumulate in float64 (float32
on MPS, which has no float64), half-precision data is computed in float32, the
running statistics are left alone when the batch statistics are not finite.
Every function here is differentiable, which is what double backward uses.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def reduce_dims(x: Tensor, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != axis)


def channel_shape(x: Tensor, axis: int) -> list[int]:
    """The shape that broadcasts a per-channel vector against ``x``."""
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return shape


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are computed in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def accumulate_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def moments(x: Tensor, dims: tuple[int, ...], where: Tensor | None = None, p: float = 2, keepdim: bool = False):
    """(mu, s^2) of ``x`` over ``dims``, accumulated in float64 (float32 on MPS): the statistics
    every normalization here shares, the reduction axes its parameter (flax's _compute_stats)::

        mu  = mean(x)
        s^2 = mean((x - mu)^2)     p = 2: the biased variance
        s^2 = mean(|x - mu|)^2     p = 1: the mean absolute deviation, squared
        s^2 = max(|x - mu|)^2      p = inf: the largest deviation, squared

    so that every one of them normalizes with (x - mu) / sqrt(s^2 + eps). With ``where`` (a
    boolean tensor broadcasting against x), over its True positions only. Differentiable.
    """
    wide = x.to(accumulate_dtype(x))
    if where is None and p == 2:
        var, mean = torch.var_mean(wide, dim=dims, correction=0, keepdim=keepdim)
        return mean, var
    if where is None:  # every position counts: no weights, the count from the shape
        w, count = 1.0, float(math.prod(x.shape[d] for d in dims))
    else:
        w = where.to(wide.dtype)
        count = torch.broadcast_to(w, wide.shape).sum(dims, keepdim=True)
    mean = (wide * w).sum(dims, keepdim=True) / count
    deviation = wide - mean
    if p == 2:
        spread = (w * deviation.square()).sum(dims, keepdim=True) / count
    elif p == 1:
        spread = ((w * deviation.abs()).sum(dims, keepdim=True) / count).square()
    elif p == math.inf:
        absolute = deviation.abs() if where is None else torch.where(where, deviation.abs(), 0.0)
        spread = absolute.amax(dims, keepdim=True).square()
    else:
        raise ValueError(f"p must be 1, 2 or math.inf, got p={p!r}")
    if keepdim:
        return mean, spread
    return mean.squeeze(dims), spread.squeeze(dims)


def batch_stats(x: Tensor, axis: int, mask: Tensor | None = None, p: float = 2) -> tuple[Tensor, Tensor]:
    """mu = mean(x) and the biased var = mean((x - mu)^2) per channel (moments over every axis
    but ``axis``; ``p`` as there). With a boolean ``mask`` of x's shape without the channel
    axis, over the True positions only: mu = sum(w x) / sum(w), var = sum(w (x - mu)^2) / sum(w)."""
    return moments(x, reduce_dims(x, axis), None if mask is None else mask.unsqueeze(axis), p)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, axis: int) -> Tensor:
    """y = (x - mu) * gamma * invstd + beta, computed in float32 or better, returned in x's dtype."""
    compute = compute_dtype(x.dtype)
    shape = channel_shape(x, axis)
    scale = invstd if weight is None else invstd * weight
    y = (x.to(compute) - mean.to(compute).view(shape)) * scale.to(compute).view(shape)
    if bias is not None:
        y = y + bias.to(compute).view(shape)
    return y.to(x.dtype)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    correction: int = 1,
) -> None:
    """The running averages (see kernels.cpu.update_running_stats), without a host sync:
    a batch with non-finite statistics leaves everything as it was.

    Computed in the wider of the buffers' and the statistics' dtypes, so that a buffer is
    rounded once, and left bit for bit as it was when the batch is refused.
    """
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    dtype = torch.promote_types(torch.promote_types(running_mean.dtype, mean.dtype), var.dtype)
    if momentum < 0:
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(dtype)
    else:
        factor = torch.tensor(momentum, dtype=dtype, device=mean.device)
    corrected = var.to(dtype) * (count / (count - correction))
    for buffer, batch in ((running_mean, mean.to(dtype)), (running_var, corrected)):
        old = buffer.to(dtype)
        buffer.copy_(torch.where(finite, (1 - factor) * old + factor * batch, old))


def forward_train(x, weight, bias, eps, axis):
    """Algorithm 1: (y, mean, invstd, biased var), the statistics in float32 or float64."""
    stat = compute_dtype(x.dtype)
    mean, var = batch_stats(x, axis)
    invstd = torch.rsqrt(var + eps)
    y = normalize(x, mean, invstd, weight, bias, axis)
    return y, mean.to(stat), invstd.to(stat), var.to(stat)


def forward_eval(x, running_mean, running_var, weight, bias, eps, axis):
    """Inference with fixed statistics: y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta."""
    invstd = torch.rsqrt(running_var.to(accumulate_dtype(x)) + eps)
    return normalize(x, running_mean, invstd, weight, bias, axis)


def backward(dy, x, mean, invstd, weight, training, axis):
    """Gradients (dx, dgamma, dbeta), differentiable in every argument.

    xhat = (x - mu) * invstd, dbeta = sum dy, dgamma = sum dy * xhat,
    training: dx = gamma*invstd/m * (m*dy - sum dy - xhat * sum(dy * xhat));
    eval: dx = gamma*invstd * dy.
    """
    compute = compute_dtype(x.dtype)
    dims = reduce_dims(x, axis)
    shape = channel_shape(x, axis)
    dy = dy.to(compute)
    mean = mean.to(compute).view(shape)
    invstd = invstd.to(compute).view(shape)
    xhat = (x.to(compute) - mean) * invstd
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)
    gain = invstd if weight is None else invstd * weight.to(compute).view(shape)
    if training:
        count = x.numel() // x.shape[axis]
        dx = gain / count * (count * dy - sum_dy.view(shape) - xhat * sum_dy_xhat.view(shape))
    else:
        dx = gain * dy
    return dx.to(x.dtype), sum_dy_xhat, sum_dy
