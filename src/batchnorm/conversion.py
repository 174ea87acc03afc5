"""One call converts a model's batch norm to this project's layers, and one call converts back.

    convert(model, *, fuse=True, inplace=False, subclasses=False) -> model with this project's layers
    revert(model) -> model with torch's BatchNorm1d/2d/3d and unfused activations

``convert`` swaps every ``torch.nn.BatchNorm1d/2d/3d`` (and ``LazyBatchNorm*``, and
``SyncBatchNorm``, which becomes this project's SyncBatchNorm with its process group) for this
project's layer of the same kind, with the same parameters, buffers, mode, device and dtype (the same
state_dict). With ``fuse=True`` it then traces the model with torch.fx and, where the graph
shows a batch norm whose output goes only into an activation, or only into an add (whose
result may go only into an activation), makes the pair (or the three) one ``BatchNormAct``
module: ``act(BN(x) + residual)``, the activation "identity" after an add alone.
Activations: the modules ``ReLU``, ``LeakyReLU``, ``ELU``,
``SiLU``, ``GELU``; the functions ``F.relu``, ``torch.relu``, ``F.leaky_relu``, ``F.elu``,
``F.silu``, ``F.gelu`` and their in-place forms; the methods ``x.relu()``, ``x.relu_()``.
Adds: ``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)``. A model that does not trace
(data-dependent control flow, say) is converted module by module, and only pairs of
neighbours in an ``nn.Sequential`` fuse, with a warning that gives the reason.

The input model is left as it was: the result is a copy (a ``torch.fx.GraphModule`` when the
graph was rewritten), so build the optimizer from the converted model's parameters.
Subclasses of torch's layers are the user's code: they are kept, with a warning that names
them, unless ``subclasses=True`` asks to convert them as their torch base class.

``revert`` gives torch's modules back: this project's layers become torch's BatchNorm1d/2d/3d
(and this project's SyncBatchNorm torch's again; ``BatchNorm`` with its channels on
another axis has no torch counterpart and is refused), and each fused layer becomes torch's
batch norm followed by the add and the activation written out in the graph, so that a
converted model and its checkpoints return to plain PyTorch (the state_dict keys never
change). Subclasses converted with ``subclasses=True`` come back as their torch base class.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.nn.functional as TF
from torch import fx, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from . import layers
from .activated import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .epilogue import INVERTIBLE
from .sync import SyncBatchNorm

__all__ = ["convert", "revert"]


# torch's layer -> this project's (exact types: subclasses are the user's code)
_OURS = {
    nn.BatchNorm1d: layers.BatchNorm1d,
    nn.BatchNorm2d: layers.BatchNorm2d,
    nn.BatchNorm3d: layers.BatchNorm3d,
    nn.LazyBatchNorm1d: layers.LazyBatchNorm1d,
    nn.LazyBatchNorm2d: layers.LazyBatchNorm2d,
    nn.LazyBatchNorm3d: layers.LazyBatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
FUSED_LAYERS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
_FUSED = {layers.BatchNorm1d: BatchNormAct1d, layers.BatchNorm2d: BatchNormAct2d, layers.BatchNorm3d: BatchNormAct3d}
_TORCH = {
    SyncBatchNorm: nn.SyncBatchNorm,
    layers.BatchNorm1d: nn.BatchNorm1d,
    layers.BatchNorm2d: nn.BatchNorm2d,
    layers.BatchNorm3d: nn.BatchNorm3d,
    BatchNormAct1d: nn.BatchNorm1d,
    BatchNormAct2d: nn.BatchNorm2d,
    BatchNormAct3d: nn.BatchNorm3d,
}
_TORCH_BASES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# ------------------------------------------------------------------ the layers


# options of this project's layers that torch's have not, stored on a layer only when not the default
_OPTIONS = ("single_value", "running_var_correction")


def _moved(source: nn.Module, cls: type, **options) -> nn.Module:
    """A ``cls`` layer holding ``source``'s parameters and buffers themselves (no copy), its
    hyperparameters and its mode."""
    lazy = issubclass(cls, layers._BatchNorm) and issubclass(cls, nn.modules.lazy.LazyModuleMixin)
    if lazy:
        target = cls(source.eps, source.momentum, source.affine, source.track_running_stats, device="meta")
    elif issubclass(cls, layers._BatchNorm):
        target = cls(
            source.num_features,
            eps=source.eps,
            momentum=source.momentum,
            affine=source.affine,
            track_running_stats=source.track_running_stats,
            device="meta",
            **options,
        )
    else:  # torch's
        target = cls(
            source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats, device="meta"
        )
    for name in _OPTIONS:  # the options of this project's layers, kept where the target has them
        if name in source.__dict__:
            if isinstance(target, layers._BatchNorm):
                target.__dict__[name] = source.__dict__[name]
            elif source.__dict__[name] != getattr(layers._BatchNorm, name):
                warnings.warn(
                    f"torch's {cls.__name__} has no {name}={source.__dict__[name]!r}: the reverted layer "
                    f"behaves as torch's ({name}={getattr(layers._BatchNorm, name)!r})",
                    UserWarning,
                    stacklevel=4,
                )
    if isinstance(target, (nn.SyncBatchNorm, SyncBatchNorm)) and isinstance(source, (nn.SyncBatchNorm, SyncBatchNorm)):
        target.process_group = source.process_group
    target._parameters = dict(source._parameters)
    target._buffers = dict(source._buffers)
    target.train(source.training)
    return target


def _copy(model: nn.Module) -> nn.Module:
    """copy.deepcopy of ``model``, with fresh uninitialized tensors for a lazy layer's (which
    refuse to be copied)."""
    memo = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if is_lazy(t):
                    kind = UninitializedParameter if isinstance(t, nn.Parameter) else UninitializedBuffer
                    memo[id(t)] = kind(requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
    return copy.deepcopy(model, memo)


def _swap_layers(model: nn.Module, subclasses: bool) -> nn.Module:
    """``model`` (a copy already) with torch's layers swapped for this project's, in place."""
    kept = []

    def ours_for(module: nn.Module):
        cls = type(module)
        if cls in _OURS:
            return _OURS[cls]
        if isinstance(module, _TORCH_BASES) and not isinstance(module, layers._BatchNorm):
            if subclasses:
                return next(_OURS.get(base, layers.BatchNorm) for base in cls.__mro__ if base in _TORCH_BASES)
            kept.append(cls.__name__)
        return None

    def swap(parent: nn.Module) -> nn.Module:
        cls = ours_for(parent)
        if cls is not None:
            return _moved(parent, cls)
        for name, child in parent.named_children():
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
        return parent

    model = swap(model)
    if kept:
        warnings.warn(
            f"batchnorm.convert kept {len(kept)} subclass(es) of torch's batch norm ({', '.join(sorted(set(kept)))}): "
            "their code is the user's; pass subclasses=True to convert them as their torch base class",
            UserWarning,
            stacklevel=3,
        )
    return model


# ------------------------------------------------------------------ activations and adds in a graph

_FUNCTIONS = {
    TF.relu: "relu",
    torch.relu: "relu",
    TF.relu_: "relu",
    torch.relu_: "relu",
    TF.leaky_relu: "leaky_relu",
    TF.leaky_relu_: "leaky_relu",
    TF.elu: "elu",
    TF.elu_: "elu",
    TF.silu: "silu",
    TF.gelu: "gelu",
}
# the arguments after the input, by position, of the functions that take more than it
_PARAMETERS = {
    TF.relu: ("inplace",),
    TF.leaky_relu: ("negative_slope", "inplace"),
    TF.leaky_relu_: ("negative_slope",),
    TF.elu: ("alpha", "inplace"),
    TF.elu_: ("alpha",),
    TF.silu: ("inplace",),
    TF.gelu: ("approximate",),
}
_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.SiLU: "silu", nn.GELU: "gelu"}
_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _constant(value) -> bool:
    return not isinstance(value, fx.Node)


def _module_activation(module: nn.Module) -> tuple[str, float, float] | None:
    """(activation, negative_slope, alpha) of an activation module, or None."""
    name = _MODULES.get(type(module))
    if name == "gelu" and module.approximate == "tanh":
        name = "gelu_tanh"
    if name is None:
        return None
    return name, float(getattr(module, "negative_slope", 0.01)), float(getattr(module, "alpha", 1.0))


def _activation(node: fx.Node, modules: dict) -> tuple[str, float, float] | None:
    """(activation, negative_slope, alpha) of an activation node whose only tensor argument is
    its first, or None."""
    slope, alpha = 0.01, 1.0
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        return _module_activation(modules.get(node.target))
    if node.op == "call_method":
        name = _METHODS.get(node.target)
        return None if name is None or len(node.args) != 1 or node.kwargs else (name, slope, alpha)
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    name = _FUNCTIONS[node.target]
    rest, options = node.args[1:], dict(node.kwargs)
    parameters = _PARAMETERS.get(node.target, ())
    if len(rest) > len(parameters) or not all(_constant(v) for v in (*rest, *options.values())):
        return None
    options.update(zip(parameters, rest, strict=False))
    if set(options) - set(parameters):
        return None
    slope = options.get("negative_slope", slope)
    alpha = options.get("alpha", alpha)
    if name == "gelu" and options.get("approximate", "none") == "tanh":
        name = "gelu_tanh"
    return name, float(slope), float(alpha)


def _residual(add: fx.Node, node: fx.Node) -> fx.Node | None:
    """The other tensor of ``add`` (a + b with ``node`` one of them), or None if it is not an add
    of two tensors."""
    is_add = (add.op == "call_function" and add.target in _ADDS) or (
        add.op == "call_method" and add.target in ("add", "add_")
    )
    if not is_add or add.kwargs or len(add.args) != 2:
        return None
    first, second = add.args
    other = second if first is node else first if second is node else None
    if not isinstance(other, fx.Node) or other is node:
        return None
    in_place = (add.op == "call_method" and add.target == "add_") or add.target is operator.iadd
    if in_place and first is not node:
        return None  # residual += y: the residual's own storage holds the result
    return other


def module_calls(graph: fx.Graph) -> dict[str, int]:
    """How many call_module nodes call each module path: a module called twice cannot be
    rewritten at one of its calls."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _fused_layer(plain: nn.Module, activation: tuple[str, float, float], inplace: bool) -> nn.Module:
    """The fused layer holding ``plain``'s tensors, in place where asked and the activation is invertible."""
    name, slope, alpha = activation
    invertible = name in INVERTIBLE and (name != "leaky_relu" or slope > 0) and (name != "elu" or alpha > 0)
    options = dict(activation=name, negative_slope=slope, alpha=alpha, inplace=inplace and invertible)
    return _moved(plain, _FUSED[type(plain)], **options)


def _fuse_graph(graph_module: fx.GraphModule, inplace: bool) -> int:
    """Rewrites ``graph_module``'s batch norm -> (add) -> activation chains into fused layers;
    returns how many."""
    modules = dict(graph_module.named_modules())
    calls = module_calls(graph_module.graph)
    fused = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in _FUSED:
            continue
        if calls[node.target] != 1 or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        residual, add = _residual(user, node), None
        if residual is not None:  # BN -> add -> activation, or BN -> add (identity)
            add = user
            after = next(iter(add.users)) if len(add.users) == 1 else None
            activation = None if after is None else _activation(after, modules)
            user = add if activation is None else after
            activation = activation or ("identity", 0.01, 1.0)
        else:
            activation = _activation(user, modules)
        if activation is None:
            continue
        layer = _fused_layer(modules[node.target], activation, inplace)
        _set_module(graph_module, node.target, layer)
        modules[node.target] = layer
        with graph_module.graph.inserting_before(user):
            arguments = (node.args[0],) if residual is None else (node.args[0], residual)
            call = graph_module.graph.call_module(node.target, arguments)
        user.replace_all_uses_with(call)
        for dead in dict.fromkeys(n for n in (user, add, node) if n is not None):  # last to first
            graph_module.graph.erase_node(dead)
        fused += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return fused


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class FusedAway(nn.Module):
    """What an activation becomes when ``convert`` fuses it into the batch norm before it in an
    ``nn.Sequential``: the identity, keeping the activation for ``revert``."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, input):
        return input


def _fuse_sequentials(model: nn.Module, inplace: bool) -> int:
    fused = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, first), (next_name, second) in zip(children, children[1:], strict=False):
            activation = _module_activation(second)
            if type(first) not in _FUSED or activation is None:
                continue
            setattr(module, name, _fused_layer(first, activation, inplace))
            setattr(module, next_name, FusedAway(second))
            fused += 1
    return fused


def convert(model: nn.Module, *, fuse: bool = True, inplace: bool = False, subclasses: bool = False) -> nn.Module:
    """``model`` with this project's batch norm (see the module docstring); ``inplace=True``
    makes fused layers with an invertible activation (identity, leaky_relu with a positive
    slope, elu) in-place activated batch norm. ``model`` itself is not changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    converted = _swap_layers(_copy(model), subclasses)
    if not fuse:
        return converted
    try:
        graph_module = fx.symbolic_trace(converted)
    except Exception as error:  # what a model that does not trace raises varies
        warnings.warn(
            f"batchnorm.convert: {type(model).__name__} does not trace with torch.fx ({type(error).__name__}: "
            f"{error}); its layers were converted one by one, and only batch norm -> activation neighbours in "
            "an nn.Sequential were fused",
            UserWarning,
            stacklevel=2,
        )
        _fuse_sequentials(converted, inplace)
        return converted
    _fuse_graph(graph_module, inplace)
    graph_module.training = converted.training  # the root's mode only: each layer keeps its own
    return graph_module


# ------------------------------------------------------------------ back to torch


def _torch_activation(graph: fx.Graph, value: fx.Node, layer) -> fx.Node:
    name = layer.activation
    if name == "identity":
        return value
    if name == "relu":
        return graph.call_function(TF.relu, (value,))
    if name == "leaky_relu":
        return graph.call_function(TF.leaky_relu, (value, layer.negative_slope))
    if name == "elu":
        return graph.call_function(TF.elu, (value, layer.alpha))
    if name == "silu":
        return graph.call_function(TF.silu, (value,))
    return graph.call_function(TF.gelu, (value,), {"approximate": "tanh" if name == "gelu_tanh" else "none"})


def _torch_layer(layer: nn.Module) -> nn.Module:
    cls = _TORCH.get(type(layer))
    if cls is None:  # BatchNorm (any axis), lazy layers
        if isinstance(layer, nn.modules.lazy.LazyModuleMixin):
            cls = {layers.LazyBatchNorm1d: nn.LazyBatchNorm1d, layers.LazyBatchNorm2d: nn.LazyBatchNorm2d}.get(
                type(layer), nn.LazyBatchNorm3d
            )
            reverted = cls(layer.eps, layer.momentum, layer.affine, layer.track_running_stats, device="meta")
            reverted._parameters, reverted._buffers = dict(layer._parameters), dict(layer._buffers)
            return reverted.train(layer.training)
        raise ValueError(
            f"revert cannot give a torch layer for {type(layer).__name__} with axis={layer.axis}: torch's "
            "BatchNorm1d/2d/3d take their channels on axis 1 and a known rank"
        )
    return _moved(layer, cls)


def revert(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with torch's layers and unfused activations (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _copy(model)
    fused = [name for name, m in model.named_modules() if isinstance(m, FUSED_LAYERS)]
    if fused:
        model = _unfuse(model, fused)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, FusedAway):
                setattr(module, name, child.activation)
            elif isinstance(child, layers._BatchNorm):
                setattr(module, name, _torch_layer(child))
    if isinstance(model, layers._BatchNorm):
        model = _torch_layer(model)
    return model


def _unfuse(model: nn.Module, fused: list[str]) -> nn.Module:
    """The fused layers as batch norm, add and activation nodes of a traced graph."""
    holders = {name for name, m in model.named_modules() if isinstance(m, nn.Sequential)}
    in_sequentials = all(name.rpartition(".")[0] in holders for name in fused)
    try:
        graph_module = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception as error:
        if in_sequentials and _sequential_fused_only(model):
            return model  # FusedAway neighbours: revert puts the activations back
        raise ValueError(
            f"revert: {type(model).__name__} does not trace with torch.fx ({type(error).__name__}: {error}), so its "
            f"fused layers ({', '.join(fused)}) cannot be written out as batch norm, add and activation"
        ) from error
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        layer = graph_module.get_submodule(node.target)
        if not isinstance(layer, FUSED_LAYERS):
            continue
        _set_module(graph_module, node.target, _torch_layer(layer))
        with graph.inserting_before(node):
            value = graph.call_module(node.target, (node.args[0],))
            if len(node.args) > 1 and node.args[1] is not None:
                value = graph.call_function(operator.add, (value, node.args[1]))
            value = _torch_activation(graph, value, layer)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _sequential_fused_only(model: nn.Module) -> bool:
    """Every fused layer sits right before a FusedAway in an nn.Sequential."""
    for module in model.modules():
        children = list(module.children())
        for k, child in enumerate(children):
            if isinstance(child, FUSED_LAYERS):
                if not isinstance(module, nn.Sequential) or k + 1 >= len(children):
                    return False
                if not isinstance(children[k + 1], FusedAway):
                    return False
    return True
