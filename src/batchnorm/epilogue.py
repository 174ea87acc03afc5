"""What a fused layer does after the normalization, as a parameter of the route.

    out = activation(y + residual)        y = gamma * (x - mu) / sqrt(var + eps) + beta

``Epilogue(activation, negative_slope, alpha, residual, save)`` travels with a call from
functional.normalize through route.normalize to the destination, so that fused layers
(BatchNormAct, in-place activated batch norm) and the variants enter the one route with
parameters rather than a route of their own. The plain layers pass none.

On the kernels' destinations the epilogue is part of the kernels' passes, and under
torch.compile, export and on other devices it is part of the fused custom ops
(fused_ops.py, whose default implementation is ``apply`` after the reference ops, with
``gradient`` and ``inverse`` for its backward); elsewhere (torch's kernel for small inputs,
the reference ops under torch.func) ``apply`` computes it in torch ops after the
normalization, which autograd differentiates. ``save`` says what the backward keeps:
"input" (x, gamma, beta and the residual) or "output" (in-place activated batch norm, Rota
Bulo et al. 2018: the activated output and the residual, from which an invertible
activation recovers x-hat; x is not kept), which the kernels' destinations and the fused
ops honour; the others keep what their torch ops keep, with the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu", "gelu_tanh")
# activations whose output determines their input (slope and alpha > 0): what save="output" takes
INVERTIBLE = ("identity", "leaky_relu", "elu")


class Epilogue(NamedTuple):
    activation: str = "identity"
    negative_slope: float = 0.01  # leaky_relu
    alpha: float = 1.0  # elu
    residual: Tensor | None = None  # added to y before the activation, the input's shape
    save: str = "input"  # what the backward keeps: "input" or "output"


def check(epilogue: Epilogue, input: Tensor) -> None:
    """The epilogue's fields, against what is allowed and the input it follows."""
    if epilogue.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got activation={epilogue.activation!r}")
    if epilogue.save not in ("input", "output"):
        raise ValueError(f"save must be 'input' or 'output', got save={epilogue.save!r}")
    if epilogue.save == "output":
        invertible = epilogue.activation in INVERTIBLE
        if epilogue.activation == "leaky_relu" and not epilogue.negative_slope > 0:
            raise ValueError(
                f"save='output' needs an invertible activation: leaky_relu with negative_slope > 0, got "
                f"negative_slope={epilogue.negative_slope!r}"
            )
        if epilogue.activation == "elu" and not epilogue.alpha > 0:
            raise ValueError(
                f"save='output' needs an invertible activation: elu with alpha > 0, got alpha={epilogue.alpha!r}"
            )
        if not invertible:
            raise ValueError(
                "save='output' needs an invertible activation (identity, leaky_relu with negative_slope > 0, elu "
                f"with alpha > 0), got activation={epilogue.activation!r}"
            )
    residual = epilogue.residual
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a tensor, got {type(residual).__name__}")
        if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
            raise ValueError(
                f"residual must have the input's shape, dtype and device ({tuple(input.shape)}, {input.dtype}, "
                f"{input.device}), got ({tuple(residual.shape)}, {residual.dtype}, {residual.device})"
            )


def apply(y: Tensor, epilogue: Epilogue) -> Tensor:
    """activation(y + residual) in torch ops (torch's functions, so torch's numbers)."""
    if epilogue.residual is not None:
        y = y + epilogue.residual
    activation = epilogue.activation
    if activation == "identity":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, epilogue.negative_slope)
    if activation == "elu":
        return F.elu(y, epilogue.alpha)
    if activation == "silu":
        return F.silu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def gradient(grad: Tensor, z: Tensor, epilogue: Epilogue) -> Tensor:
    """d out/d z * grad at z = y + residual, with torch's own backward functions."""
    activation, aten = epilogue.activation, torch.ops.aten
    if activation == "identity":
        return grad
    if activation == "relu":
        return aten.threshold_backward(grad, z, 0)
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(grad, z, epilogue.negative_slope, False)
    if activation == "elu":
        return aten.elu_backward(grad, epilogue.alpha, 1, 1, False, z)
    if activation == "silu":
        return aten.silu_backward(grad, z)
    return aten.gelu_backward(grad, z, approximate="tanh" if activation == "gelu_tanh" else "none")


def inverse(out: Tensor, epilogue: Epilogue) -> Tensor:
    """z from out = activation(z), for the invertible activations (INVERTIBLE)."""
    if epilogue.activation == "leaky_relu":
        return torch.where(out > 0, out, out / epilogue.negative_slope)
    if epilogue.activation == "elu":
        return torch.where(out > 0, out, torch.log1p(out / epilogue.alpha))
    return out
