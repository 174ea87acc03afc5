"""Batch normalization fused with its activation and a residual add: ``BatchNormAct1d/2d/3d``.

    out = act(BN(x) + residual)        BN(x) = weight * (x - mu) / sqrt(var + eps) + bias

A CNN block writes BN, then the residual add, then the activation: three passes over
memory forward and three back, each keeping its own intermediate alive. These layers
make it one pass of the kernels each way on the CPU (the activation a compile-time
parameter of the normalization's own map and gradient passes, kernels/activation.py), one
custom op for torch.compile, export and other devices (fused_ops.py), and torch's ops after
the normalization inside torch.func transforms, with the same numbers. They subclass this
project's BatchNorm1d/2d/3d: the parameters, buffers, state_dict keys and modes are theirs
(as timm's ``BatchNormAct2d``).
"""

from __future__ import annotations

import torch

from . import epilogue as epilogues
from .epilogue import ACTIVATIONS, Epilogue
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

Tensor = torch.Tensor

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormAct:
    """The fused layers' part: the activation's options and forward(x, residual)."""

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        inplace: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got activation={activation!r}")
        if inplace:
            epilogues.check(Epilogue(activation, negative_slope, alpha, None, "output"), None)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)
        self.inplace = inplace

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """act(BN(input) + residual); ``residual`` (optional) has the input's shape, dtype and device."""
        save = "output" if self.inplace else "input"
        epilogue = Epilogue(self.activation, self.negative_slope, self.alpha, residual, save)
        arguments = (input,) if residual is None else (input, residual)
        return self._normalize(input, epilogue, arguments)

    def extra_repr(self) -> str:
        options = f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            options += f", negative_slope={self.negative_slope}"
        if self.activation == "elu":
            options += f", alpha={self.alpha}"
        if self.inplace:
            options += ", inplace=True"
        return super().extra_repr() + options


_DOC = """{torch_name} with its activation and an optional residual add, fused:
``forward(x, residual=None)`` returns ``act(BN(x) + residual)``.

Args: those of ``batchnorm.{base}`` (num_features; keyword-only here: eps, momentum,
affine, track_running_stats, device, dtype), and
    activation: one of {activations}. Default: "relu"
    negative_slope: leaky_relu's slope for z < 0. Default: 0.01
    alpha: elu's alpha. Default: 1.0
    inplace: in-place activated batch norm (Rota Bulo et al. 2018): backward keeps only the
        output (and the residual, when one is added), not x, and recovers x-hat from it;
        needs an invertible activation (identity, leaky_relu with negative_slope > 0, elu
        with alpha > 0); a |weight| below 1e-5 counts as 1e-5 in the inversion; no double
        backward. Default: False
"""


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    __doc__ = _DOC.format(torch_name="BatchNorm1d", base="BatchNorm1d", activations=", ".join(ACTIVATIONS))


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    __doc__ = _DOC.format(torch_name="BatchNorm2d", base="BatchNorm2d", activations=", ".join(ACTIVATIONS))


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    __doc__ = _DOC.format(torch_name="BatchNorm3d", base="BatchNorm3d", activations=", ".join(ACTIVATIONS))
