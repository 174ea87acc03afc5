"""Frozen batch norm: the evaluation transform in both modes, nothing learned or updated.

    y = act(weight * (x - running_mean) / sqrt(running_var + eps) + bias + residual)

``FrozenBatchNorm1d/2d/3d`` have torchvision's ``FrozenBatchNorm2d`` semantics: weight,
bias, running_mean and running_var are buffers (no parameters, no gradient for them, the
statistics never updated), the same in training and evaluation, and a state_dict that loads
from and into torchvision's layer and torch's ``BatchNorm*d`` (``num_batches_tracked`` is
dropped on the way in and restored as 0 by torch's layer on the way out). The input still
gets its gradient (eval's: ``weight / sqrt(running_var + eps) * dy``).

A frozen layer may carry a fused layer's activation (``activation``, ``negative_slope``,
``alpha``) and take ``forward(x, residual=None)``, so that ``freeze`` keeps a
``BatchNormAct`` fused: its epilogue stays in the kernels' pass.

``freeze(model, names=None)`` returns a copy of ``model`` with its batch norms (torch's,
this project's, fused or not; those named, by their module names, when ``names`` is given)
frozen with their current values; ``unfreeze(model)`` returns a copy with each frozen layer
back as the layer it was frozen from (its class and options: a renorm or ghost layer stays
one, torch's stays torch's), holding the frozen values; a frozen layer built directly becomes
this project's BatchNorm*d (or BatchNormAct*d with its activation), num_batches_tracked 0.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from . import layers
from .activated import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .epilogue import ACTIVATIONS, Epilogue

Tensor = torch.Tensor

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]


class _FrozenBatchNorm(nn.Module):
    axis = 1
    ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        activation: str = "identity",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        layers._check_constructor(num_features, eps, 0.1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got activation={activation!r}")
        super().__init__()
        options = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.activation, self.negative_slope, self.alpha = activation, float(negative_slope), float(alpha)
        self.register_buffer("weight", torch.ones(num_features, **options))
        self.register_buffer("bias", torch.zeros(num_features, **options))
        self.register_buffer("running_mean", torch.zeros(num_features, **options))
        self.register_buffer("running_var", torch.ones(num_features, **options))

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and isinstance(input, torch.fx.Proxy):  # one call_module node, as the others
            arguments = (input,) if residual is None else (input, residual)
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), arguments, {})
        if input.dim() not in self.ranks:
            ranks = " or ".join(f"{r}D" for r in self.ranks)
            raise ValueError(f"expected {ranks} input (got {input.dim()}D input)")
        epilogue = None
        if self.activation != "identity" or residual is not None:
            epilogue = Epilogue(self.activation, self.negative_slope, self.alpha, residual)
        buffers = self._buffers
        return F.normalize(
            input, buffers["running_mean"], buffers["running_var"], buffers["weight"], buffers["bias"], False, 0.0,
            self.eps, 1, None, self, epilogue,
        )  # fmt: skip

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # torch's layers have it; frozen ones do not
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        options = "" if self.activation == "identity" else f", activation={self.activation!r}"
        return f"{self.num_features}, eps={self.eps}{options}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input (see the module docstring)."""

    ranks = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, H, W) input, torchvision's FrozenBatchNorm2d (see the module docstring)."""

    ranks = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input (see the module docstring)."""

    ranks = (5,)


# the trainable kinds, by rank, and what each freezes into
_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_RANK = {
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
    layers.BatchNorm1d: 1, layers.BatchNorm2d: 2, layers.BatchNorm3d: 3,
    BatchNormAct1d: 1, BatchNormAct2d: 2, BatchNormAct3d: 3,
}  # fmt: skip
_PLAIN = {1: layers.BatchNorm1d, 2: layers.BatchNorm2d, 3: layers.BatchNorm3d}
_FUSED = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}


def _rank_of(module: nn.Module) -> int | None:
    for cls, rank in _RANK.items():
        if isinstance(module, cls):
            return rank
    return None


def _frozen_from(layer: nn.Module) -> _FrozenBatchNorm:
    rank = _rank_of(layer)
    options = {}
    if isinstance(layer, (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)):
        if layer.inplace:
            raise ValueError(
                "freeze cannot keep an in-place activated batch norm (inplace=True) in place: a frozen layer's "
                "backward needs its input; convert it with inplace=False first"
            )
        options = {"activation": layer.activation, "negative_slope": layer.negative_slope, "alpha": layer.alpha}
    if layer.running_mean is None:
        raise ValueError(
            f"freeze needs running statistics: {type(layer).__name__} was built with track_running_stats=False"
        )
    reference = layer.running_mean
    frozen = _FROZEN[rank](layer.num_features, layer.eps, device=reference.device, dtype=reference.dtype, **options)
    with torch.no_grad():
        for name in ("running_mean", "running_var"):
            frozen._buffers[name].copy_(getattr(layer, name))
        if layer.weight is not None:
            frozen.weight.copy_(layer.weight)
        if layer.bias is not None:
            frozen.bias.copy_(layer.bias)
    frozen.train(layer.training)
    object.__setattr__(frozen, "_thawed", layer)  # not a submodule: no state_dict entries
    return frozen


def _thawed_from(frozen: _FrozenBatchNorm, rank: int) -> nn.Module:
    layer = frozen.__dict__.get("_thawed")
    if layer is not None:  # the layer it was frozen from, with the frozen values
        with torch.no_grad():
            for name in ("running_mean", "running_var", "weight", "bias"):
                if getattr(layer, name) is not None:
                    getattr(layer, name).copy_(frozen._buffers[name])
        return layer.train(frozen.training)
    if frozen.activation == "identity":
        layer = _PLAIN[rank](frozen.num_features, eps=frozen.eps)
    else:
        layer = _FUSED[rank](
            frozen.num_features, frozen.activation, eps=frozen.eps, negative_slope=frozen.negative_slope,
            alpha=frozen.alpha,
        )  # fmt: skip
    layer = layer.to(device=frozen.running_mean.device, dtype=frozen.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, name).copy_(frozen._buffers[name])
    layer.train(frozen.training)
    return layer


def _replace(model: nn.Module, make, wanted) -> nn.Module:
    from .conversion import _copy, _set_module

    model = _copy(model)
    for name, module in list(model.named_modules()):
        if wanted(name, module):
            replacement = make(module)
            if name == "":
                return replacement
            _set_module(model, name, replacement)
    return model


def freeze(model: nn.Module, names=None) -> nn.Module:
    """A copy of ``model`` with its batch norms frozen (all, or those in ``names``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    present = {name for name, module in model.named_modules() if _rank_of(module) is not None}
    if names is not None:
        names = set(names)
        unknown = sorted(names - present)
        if unknown:
            raise ValueError(f"names must name batch-norm layers of the model; not one: {', '.join(unknown)}")
    return _replace(model, _frozen_from, lambda name, module: name in present and (names is None or name in names))


def unfreeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every frozen layer trainable again, with its values."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ranks = {FrozenBatchNorm1d: 1, FrozenBatchNorm2d: 2, FrozenBatchNorm3d: 3}
    return _replace(
        model, lambda frozen: _thawed_from(frozen, ranks[type(frozen)]), lambda _, m: isinstance(m, _FrozenBatchNorm)
    )
