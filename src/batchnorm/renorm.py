"""Batch renormalization (Ioffe 2017, arXiv 1702.03275): ``BatchRenorm1d/2d/3d`` and ``BatchRenorm``.

Training, per channel, with the batch's mean mu_B and sigma_B = sqrt(var_B + eps) (var_B
biased) and the running mu and sigma = sqrt(running_var + eps):

    r    = clip(sigma_B / sigma, 1/rmax, rmax)          held constant: no gradient
    d    = clip((mu_B - mu) / sigma, -dmax, dmax)       held constant: no gradient
    xhat = (x - mu_B) / sigma_B * r + d
    y    = weight * xhat + bias
    mu    = mu    + momentum * (mu_B - mu)               the running mean and the running
    sigma = sigma + momentum * (sigma_B - sigma)         standard deviation (the paper's update)

Evaluation: y = weight * (x - mu) / sigma + bias, BatchNorm's evaluation. The running
standard deviation is kept as ``running_var = sigma^2 - eps``, so that the buffers, the
state_dict and the evaluation are BatchNorm's. With rmax = 1 and dmax = 0 the training output
is BatchNorm's (r = 1, d = 0); only the running update differs (sigma, not the unbiased var).

Since r and d are constants, y is BatchNorm of x with weight * r and bias + weight * d: the
layer computes the batch statistics (functional.batch_statistics, the plain layer's), r and
d, then one plain batch-norm call, so the kernels and the gradients are the plain layer's.

The paper's schedule: rmax and dmax start at 1 and 0 (plain BN) and widen linearly to their
final values, from ``warmup_steps`` to ``rmax_steps`` and ``dmax_steps`` (5k, 40k and 25k
steps in the paper), counted by ``num_batches_tracked``. ``momentum`` is the renorm momentum
(the weight of the new batch); the cumulative average (None) is not defined for renorm. A
training batch with non-finite statistics updates nothing.
"""

from __future__ import annotations

import warnings

import torch

from . import functional as F
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

Tensor = torch.Tensor

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

NONFINITE = (
    "batch renorm: the training batch's statistics are not finite; running_mean, running_var and "
    "num_batches_tracked were left unchanged"
)


def _number(name: str, value, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"{name} must be a number >= {low}, got {name}={value!r}")
    return float(value)


class _Renorm:
    def _setup_renorm(self, rmax, dmax, warmup_steps, rmax_steps, dmax_steps) -> None:
        if self.momentum is None:
            raise ValueError("batch renorm needs a momentum in [0, 1] (its running standard deviation), got None")
        if not self.track_running_stats:
            raise ValueError("batch renorm needs its running statistics: track_running_stats=False is not allowed")
        self.rmax, self.dmax = _number("rmax", rmax, 1.0), _number("dmax", dmax, 0.0)
        steps = {"warmup_steps": warmup_steps, "rmax_steps": rmax_steps, "dmax_steps": dmax_steps}
        for name, value in steps.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {name}={value!r}")
        for name in ("rmax_steps", "dmax_steps"):
            if steps[name] < warmup_steps:
                raise ValueError(f"{name} must be at least warmup_steps={warmup_steps}, got {name}={steps[name]}")
        self.warmup_steps, self.rmax_steps, self.dmax_steps = warmup_steps, rmax_steps, dmax_steps

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(rmax, dmax) at ``step`` (default: num_batches_tracked): 1 and 0 until warmup_steps,
        then linear to rmax at rmax_steps and to dmax at dmax_steps."""
        step = int(self.num_batches_tracked) if step is None else step

        def ramp(start: float, end: float, until: int) -> float:
            if step >= until:
                return end
            if step <= self.warmup_steps:
                return start
            return start + (end - start) * (step - self.warmup_steps) / (until - self.warmup_steps)

        return ramp(1.0, self.rmax, self.rmax_steps), ramp(0.0, self.dmax, self.dmax_steps)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or type(input) is not Tensor:
            return super().forward(input)  # evaluation, and tracing: BatchNorm's
        self._check_input_dim(input)
        if input.shape[self.axis] != self.num_features or input.numel() == input.shape[self.axis]:
            return super().forward(input)  # the plain layer's errors
        mean, var = F.batch_statistics(input, self.axis)
        rmax, dmax = self.limits()
        with torch.no_grad():
            sigma_batch = torch.sqrt(var + self.eps)
            running_mean = self.running_mean.to(var.dtype)
            sigma = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
            r = (sigma_batch / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean - running_mean) / sigma).clamp(-dmax, dmax)
        dtype = self.running_mean.dtype
        r, d = r.to(dtype), d.to(dtype)
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d
        if self.bias is not None:
            bias = bias + self.bias
        y = F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps, self.axis)
        with torch.no_grad():
            finite = torch.isfinite(mean).all() & torch.isfinite(sigma_batch).all()
            new_mean = (running_mean + self.momentum * (mean - running_mean)).to(dtype)
            new_sigma = sigma + self.momentum * (sigma_batch - sigma)
            new_var = (new_sigma * new_sigma - self.eps).to(dtype)
            self.running_mean.copy_(torch.where(finite, new_mean, self.running_mean))
            self.running_var.copy_(torch.where(finite, new_var, self.running_var))
            self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        if input.device.type == "cpu" and not bool(finite):
            warnings.warn(NONFINITE, RuntimeWarning, stacklevel=2)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, rmax_steps={self.rmax_steps}, "
            f"dmax_steps={self.dmax_steps}"
        )


def _renorm_init(base):
    def __init__(
        self,
        num_features: int,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        rmax_steps: int = 40000,
        dmax_steps: int = 25000,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        device=None,
        dtype=None,
        **axis,
    ) -> None:
        base.__init__(self, num_features, eps, momentum, affine, True, device, dtype, **axis)
        self._setup_renorm(rmax, dmax, warmup_steps, rmax_steps, dmax_steps)

    return __init__


_DOC = """Batch renormalization over {what} (see batchnorm.renorm for the formulas).

Args: num_features; rmax (3.0) and dmax (5.0), the final clips of r and d; warmup_steps
(5000), rmax_steps (40000), dmax_steps (25000), the schedule; eps; momentum (0.01, the renorm
momentum: the weight of the new batch in the running mean and standard deviation); affine;
device, dtype{extra}. The buffers and state_dict are {base}'s.
"""


class BatchRenorm1d(_Renorm, BatchNorm1d):
    __doc__ = _DOC.format(what="(N, C) or (N, C, L) input", extra="", base="BatchNorm1d")
    __init__ = _renorm_init(BatchNorm1d)


class BatchRenorm2d(_Renorm, BatchNorm2d):
    __doc__ = _DOC.format(what="(N, C, H, W) input", extra="", base="BatchNorm2d")
    __init__ = _renorm_init(BatchNorm2d)


class BatchRenorm3d(_Renorm, BatchNorm3d):
    __doc__ = _DOC.format(what="(N, C, D, H, W) input", extra="", base="BatchNorm3d")
    __init__ = _renorm_init(BatchNorm3d)


class BatchRenorm(_Renorm, BatchNorm):
    __doc__ = _DOC.format(
        what="input of rank 2 or more with its channels on ``axis``", extra="; axis (keyword-only, 1)", base="BatchNorm"
    )
    __init__ = _renorm_init(BatchNorm)
