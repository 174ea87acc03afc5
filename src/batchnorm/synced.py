"""Batch-norm statistics over every process of a torch.distributed group, and their gradients.

Training, per channel, with rank r holding n_r values of mean mu_r and M2_r = sum (x - mu_r)^2
(float64), one all_gather of (n_r, mu_r, M2_r) from every rank, merged exactly (Chan, Golub &
LeVeque; the ranks in order, so every rank computes the same numbers)::

    N = sum n_r      mu = sum n_r mu_r / N      var = (sum M2_r + sum n_r (mu_r - mu)^2) / N
    y = weight * (x - mu) / sqrt(var + eps) + bias

the statistics of the concatenated batch. Backward, with xhat = (x - mu) * invstd, one
all_reduce of the local (sum dy, sum dy * xhat) in float64::

    dx = weight * invstd * (dy - sum_all(dy) / N - xhat * sum_all(dy * xhat) / N)
    dweight = sum_local(dy * xhat)        dbias = sum_local(dy)

the parameter gradients local, as torch's SyncBatchNorm leaves them: DistributedDataParallel
averages them over the ranks. A rank with an empty batch sends n = 0, takes part in both
collectives (no hang) and gets an empty output; N < 2 raises on every rank alike. The running
update is the plain layer's from (mu, var, N), the same on every rank, and so is the refusal of
non-finite statistics: if any rank's batch is not finite, no rank updates.

The local moments and the maps are torch ops (kernels/reference.py), on any device the
group's backend serves: gloo on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import ops
from .kernels import reference

Tensor = torch.Tensor


def world(group) -> int:
    """The number of processes batch norm synchronizes over: 1 outside an initialized group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def merged_moments(input: Tensor, axis: int, group) -> tuple[Tensor, Tensor, int]:
    """(mu, biased var, N) per channel of the batch concatenated over the group, float64."""
    C = input.shape[axis]
    wide = torch.float64 if input.device.type != "mps" else torch.float32
    local = torch.zeros(3, C, dtype=wide, device=input.device)
    n = input.numel() // C if C else 0
    if n:
        mean, var = reference.batch_stats(input.detach(), axis)
        local[0] = n
        local[1] = mean.to(wide)
        local[2] = var.to(wide) * n
    gathered = [torch.empty_like(local) for _ in range(world(group))]
    dist.all_gather(gathered, local, group=group)
    counts = torch.stack([g[0] for g in gathered])  # (world, C)
    means = torch.stack([g[1] for g in gathered])
    total = counts.sum(0)
    N = int(total[0].item()) if C else 0
    if N == 0:
        return torch.zeros(C, dtype=wide, device=input.device), torch.zeros(C, dtype=wide, device=input.device), 0
    mean = (counts * means).sum(0) / total
    m2 = torch.stack([g[2] for g in gathered]).sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total, N


class _Synced(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, eps, axis, running, group):
        mean, var, N = merged_moments(input, axis, group)
        if N < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training over the process group, got {N} "
                f"(this rank's input size {tuple(input.shape)})"
            )
        invstd = torch.rsqrt(var + eps)
        if running is not None:
            running_mean, running_var, num_batches_tracked, _count, momentum, correction = running
            dtype = running_mean.dtype
            ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.to(dtype), var.to(dtype), N, momentum, correction
            )
        y = reference.normalize(input, mean, invstd, weight, bias, axis)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.axis, ctx.N, ctx.group = axis, N, group
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        axis, N = ctx.axis, ctx.N
        dims, shape = reference.reduce_dims(input, axis), reference.channel_shape(input, axis)
        compute = reference.compute_dtype(input.dtype)
        dy = grad_output.to(compute)
        xhat = (input.to(compute) - mean.to(compute).view(shape)) * invstd.to(compute).view(shape)
        local = torch.stack([dy.sum(dims).to(mean.dtype), (dy * xhat).sum(dims).to(mean.dtype)])
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        gain = invstd if weight is None else invstd * weight.to(invstd.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            mean_dy = (sums[0] / N).to(compute).view(shape)
            mean_dy_xhat = (sums[1] / N).to(compute).view(shape)
            dx = (gain.to(compute).view(shape) * (dy - mean_dy - xhat * mean_dy_xhat)).to(input.dtype)
        dweight = local[1].to(compute) if ctx.needs_input_grad[1] else None
        dbias = local[0].to(compute) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None


def normalize(input: Tensor, weight, bias, eps: float, axis: int, running, group) -> Tensor:
    """Training over the group of checked arguments (functional.normalize); ``running`` as
    route.normalize takes it, or None for no update."""
    return _Synced.apply(input, weight, bias, eps, axis, running, group)
