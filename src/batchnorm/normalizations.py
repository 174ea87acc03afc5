"""The normalizations batch norm is compared with: ``LayerNorm``, ``GroupNorm``,
``InstanceNorm1d/2d/3d``, drop-ins for torch.nn's (their arguments, parameters, buffers and
state_dict keys), with their functional forms ``layer_norm``, ``group_norm``, ``instance_norm``.

Each is the same standardization over other axes, with the statistics every normalization here
shares (kernels/reference.py, ``moments``: float64 accumulation, the biased variance)::

    y = (x - mu) / sqrt(var + eps) * weight + bias

    LayerNorm     mu, var over the last len(normalized_shape) axes of each example;
                  weight and bias of normalized_shape (Ba, Kiros & Hinton 2016)
    GroupNorm     mu, var over each group of C / G channels and the spatial axes of each
                  example; weight and bias per channel (Wu & He 2018)
    InstanceNorm  mu, var over the spatial axes of each example and channel; weight and bias
                  per channel when affine (Ulyanov et al. 2016)

None depends on the batch, so none differs between training and evaluation, except
InstanceNorm with ``track_running_stats``: training updates running_mean and running_var with
the mean over the batch of each example's mean and unbiased variance (as torch), evaluation
normalizes with them. Unlike torch's, that update counts ``num_batches_tracked``, makes
``momentum=None`` the cumulative average (torch makes no update at all), and leaves the
buffers unchanged for a batch with non-finite statistics (torch writes NaN into them).

They are torch ops on any device, not kernels of this project: they need not be faster than
torch's, only equal to them (tests/test_normalizations.py).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from . import ops
from .kernels import reference

Tensor = torch.Tensor

__all__ = [
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "group_norm",
    "instance_norm",
    "layer_norm",
]


def _standardize(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """(x - mu) / sqrt(var + eps) over ``dims``, in float32 or better (moments' statistics)."""
    mean, var = reference.moments(x, dims, keepdim=True)
    compute = reference.compute_dtype(x.dtype)
    return (x.to(compute) - mean.to(compute)) * torch.rsqrt(var + eps).to(compute)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int], dtype: torch.dtype) -> Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    return y.to(dtype)


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got eps={eps!r}")


def layer_norm(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.layer_norm: each example standardized over its last
    len(normalized_shape) axes, then ``weight`` and ``bias`` (of normalized_shape) applied."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    _check_eps(eps)
    k = len(shape)
    if k == 0 or input.dim() < k or list(input.shape[input.dim() - k :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={shape}, expected input with shape [*, {', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and list(tensor.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                               f"{list(tensor.shape)} and normalized_shape = {shape}")  # fmt: skip
    dims = tuple(range(input.dim() - k, input.dim()))
    return _affine(_standardize(input, dims, eps), weight, bias, shape, input.dtype)


def group_norm(input: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.group_norm: each example's channels in ``num_groups`` groups, each
    group standardized over its channels and the spatial axes; per-channel weight and bias."""
    _check_eps(eps)
    if input.dim() < 2:
        raise ValueError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    N, C = input.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    grouped = input.reshape(N, num_groups, -1)
    y = _standardize(grouped, (2,), eps).reshape(input.shape)
    return _affine(y, weight, bias, [1, C] + [1] * (input.dim() - 2), input.dtype)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """torch.nn.functional.instance_norm on (N, C, ...) input: each example's channels
    standardized over the spatial axes (``use_input_stats``), the running buffers updated when
    given; or the running statistics, per channel (see the module docstring)."""
    _check_eps(eps)
    if input.dim() < 3:
        raise ValueError(f"instance_norm expects (N, C, ...) input with spatial axes, got input of size {input.size()}")
    C = input.shape[1]
    shape = [1, C] + [1] * (input.dim() - 2)
    spatial = tuple(range(2, input.dim()))
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
        invstd = torch.rsqrt(running_var.to(reference.accumulate_dtype(input)) + eps)
        return reference.normalize(input, running_mean, invstd, weight, bias, 1)
    values = input[0, 0].numel() if input.shape[0] and C else 0
    if values <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    if running_mean is not None:
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        with torch.no_grad():
            mean, var = reference.moments(input.detach(), spatial)  # (N, C) each
            dtype = running_mean.dtype
            ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.mean(0).to(dtype),
                (var * (values / (values - 1))).mean(0).to(dtype), values, -1.0 if momentum is None else momentum, 0,
            )  # fmt: skip
    return _affine(_standardize(input, spatial, eps), weight, bias, shape, input.dtype)


class LayerNorm(nn.Module):
    """Layer normalization (see batchnorm.normalizations), a drop-in for torch.nn.LayerNorm:
    ``normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device, dtype``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
            raise ValueError(f"normalized_shape must be positive integers, got normalized_shape={normalized_shape!r}")
        _check_eps(eps)
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(shape, **kwargs)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **kwargs)) if elementwise_affine and bias else None

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(nn.Module):
    """Group normalization (see batchnorm.normalizations), a drop-in for torch.nn.GroupNorm:
    ``num_groups, num_channels, eps=1e-5, affine=True, device, dtype``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if num_channels % num_groups:
            raise ValueError(f"num_channels must be divisible by num_groups, got {num_channels} and {num_groups}")
        _check_eps(eps)
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **kwargs)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, **kwargs)) if affine else None

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class _InstanceNorm(nn.Module):
    _version = 2
    _rank: int  # the rank of a batched input

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive integer, got num_features={num_features!r}")
        _check_eps(eps)
        if momentum is not None and (isinstance(momentum, bool) or not 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1] or None, got momentum={momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **kwargs)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **kwargs)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in (self._rank - 1, self._rank):
            raise ValueError(f"expected {self._rank - 1}D or {self._rank}D input (got {input.dim()}D input)")
        unbatched = input.dim() == self._rank - 1
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={0 if unbatched else 1} to match num_features "
                    f"({self.num_features}), but got: {x.shape[1]}."
                )
        y = instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats, self.momentum, self.eps, self.num_batches_tracked,
        )  # fmt: skip
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization of (N, C, L) or (C, L) input (see batchnorm.normalizations), a drop-in for
    torch.nn.InstanceNorm1d: ``num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False``."""

    _rank = 3


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization of (N, C, H, W) or (C, H, W) input, a drop-in for torch.nn.InstanceNorm2d."""

    _rank = 4


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization of (N, C, D, H, W) or (C, D, H, W) input, a drop-in for torch.nn.InstanceNorm3d."""

    _rank = 5
