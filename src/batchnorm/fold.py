"""Batch norm folded into the convolution or linear layer before it, for inference.

In evaluation batch norm is a fixed affine map per channel (Algorithm 2 of the paper):

    y = gamma * (z - running_mean) / sqrt(running_var + eps) + beta,   z = W x + b

so ``W' = W * s`` and ``b' = (b - running_mean) * s + beta`` with ``s = gamma / sqrt(running_var
+ eps)`` per output channel give ``y = W' x + b'``: one layer instead of two. Two levels, as
torch.nn.utils.fusion has them:

    fold_weights(weight, bias, running_mean, running_var, eps, gamma, beta, channel_dim=0)
        the pure tensor function (computed in float64, returned in the weight's dtype)
    fold(model)
        a copy of an eval-mode model with every Conv1d/2d/3d or Linear -> batch norm pair
        folded (torch's layers and this project's, fused or not)

``fold`` traces the model with torch.fx. A fused layer's activation and residual add stay,
after the folded layer in the graph, as one pass (``functional.activate``: act(conv(x) +
residual)). A convolution
whose output goes anywhere else, a batch norm without running statistics (which normalizes
with the batch's statistics in eval too) or one called twice is left as it is. A model that
does not trace is folded only where a layer and its batch norm are neighbours in an
``nn.Sequential``, with a warning that gives the reason. A model in training mode is refused.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from . import conversion, layers
from . import functional as F
from .frozen import _FrozenBatchNorm

__all__ = ["fold", "fold_weights"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    channel_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W * s, (b - running_mean) * s + beta) with s = gamma / sqrt(running_var + eps), s
    broadcast along ``channel_dim`` of the weight (0 for Conv*d and Linear, (out, in, ...));
    gamma 1 and beta 0 when None, b 0 when None. float64 inside, the weight's dtype out."""
    channels = weight.shape[channel_dim]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("gamma", gamma), ("beta", beta),
                    ("bias", bias)):  # fmt: skip
        if t is not None and t.shape != (channels,):
            raise ValueError(
                f"{name} must have one value per output channel ({channels}, dim {channel_dim} of the weight), "
                f"got shape {tuple(t.shape)}"
            )
    wide = torch.float64 if weight.device.type != "mps" else torch.float32
    scale = torch.rsqrt(running_var.to(wide) + eps)
    if gamma is not None:
        scale = scale * gamma.to(wide)
    shape = [1] * weight.dim()
    shape[channel_dim] = channels
    folded_weight = weight.to(wide) * scale.view(shape)
    b = -running_mean.to(wide) if bias is None else bias.to(wide) - running_mean.to(wide)
    folded_bias = b * scale if beta is None else b * scale + beta.to(wide)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def _folded_layer(layer: nn.Module, norm: nn.Module) -> nn.Module:
    weight, bias = fold_weights(
        layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), norm.running_mean,
        norm.running_var, norm.eps, None if norm.weight is None else norm.weight.detach(),
        None if norm.bias is None else norm.bias.detach(),
    )  # fmt: skip
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    return folded


def _norm_of(module: nn.Module) -> bool:
    """Batch norm that eval reduces to a fixed per-channel map on axis 1: torch's or this
    project's, with running statistics."""
    if isinstance(module, _FrozenBatchNorm):
        return True
    if isinstance(module, layers._BatchNorm):
        plain = module.axis == 1
    else:
        plain = isinstance(module, nn.modules.batchnorm._BatchNorm)
    return plain and module.running_mean is not None and module.running_var is not None


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError(
            "fold needs a model in eval mode (call model.eval() first): in training, batch norm normalizes "
            "with each batch's statistics, which no weights can hold; got a model in training mode"
        )
    for name, module in model.named_modules():
        if _norm_of(module) and module.training and not isinstance(module, _FrozenBatchNorm):
            raise ValueError(
                f"fold needs every batch norm in eval mode: {name} ({type(module).__name__}) is in training mode"
            )


def fold(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode ``model`` with its layer -> batch norm pairs folded (see the
    module docstring); ``model`` itself is not changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_eval(model)
    model = conversion._copy(model)
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:  # what a model that does not trace raises varies
        warnings.warn(
            f"batchnorm.fold: {type(model).__name__} does not trace with torch.fx ({type(error).__name__}: "
            f"{error}); only layer -> batch norm neighbours in an nn.Sequential were folded",
            UserWarning,
            stacklevel=2,
        )
        _fold_sequentials(model)
        return model
    _fold_graph(graph_module)
    graph_module.training = False
    return graph_module


def _fold_graph(graph_module: fx.GraphModule) -> int:
    graph = graph_module.graph
    calls = conversion.module_calls(graph)
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(graph_module.get_submodule(node.target), _FOLDABLE):
            continue
        if len(node.users) != 1 or calls[node.target] != 1:
            continue
        norm_node = next(iter(node.users))
        if norm_node.op != "call_module" or calls[norm_node.target] != 1 or norm_node.args[0] is not node:
            continue
        norm = graph_module.get_submodule(norm_node.target)
        layer = graph_module.get_submodule(node.target)
        if not _norm_of(norm) or norm.num_features != layer.weight.shape[0]:
            continue
        if node in norm_node.args[1:]:
            continue  # the layer's output is the residual too
        conversion._set_module(graph_module, node.target, _folded_layer(layer, norm))
        value = node
        activation = getattr(norm, "activation", "identity")  # a fused or frozen layer's epilogue stays
        residual = norm_node.args[1] if len(norm_node.args) > 1 else None
        if residual is not None or activation != "identity":
            with graph.inserting_before(norm_node):
                arguments = (value, residual, activation, norm.negative_slope, norm.alpha)
                value = graph.call_function(F.activate, arguments)
        norm_node.replace_all_uses_with(value)
        graph.erase_node(norm_node)
        folded += 1
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return folded


def _fold_sequentials(model: nn.Module) -> None:
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for k, ((name, first), (next_name, second)) in enumerate(zip(children, children[1:], strict=False)):
            if not isinstance(first, _FOLDABLE) or not _norm_of(second) or second.num_features != first.weight.shape[0]:
                continue
            after = children[k + 2] if k + 2 < len(children) else (None, None)
            if getattr(second, "activation", "identity") != "identity":  # its activation: the FusedAway after it
                if not isinstance(after[1], conversion.FusedAway):
                    continue
                setattr(module, after[0], after[1].activation)
            setattr(module, name, _folded_layer(first, second))
            setattr(module, next_name, nn.Identity())
