"""Whole models to synchronized batch norm and back.

    convert_sync_batchnorm(model, process_group=None, *, subclasses=False) -> a copy with SyncBatchNorm
    revert_sync_batchnorm(model) -> a copy with BatchNorm in its place

``convert_sync_batchnorm`` swaps torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` and this
project's ``BatchNorm1d/2d/3d`` and ``BatchNorm`` (its axis kept) for ``batchnorm.SyncBatchNorm``
over ``process_group``, with the same parameters, buffers (the same state_dict), mode and options.
Unlike torch's ``convert_sync_batchnorm`` it does not silently turn users' subclasses of torch's
layers into the base class (pytorch#187298): they are kept, with a warning naming them, unless
``subclasses=True`` asks for that. Layers that have no synchronized form yet are refused with
their names: the fused layers (convert the model with ``fuse=False``, or revert it first),
ghost batch norm, batch renorm, lp batch norm and lazy layers not yet initialized. Frozen batch
norm and the other normalizations use no batch statistics across examples and stay as they are.

``revert_sync_batchnorm`` makes every SyncBatchNorm (this project's or torch's) this project's
``BatchNorm`` on the same axis, with its state: the model runs in one process again.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import layers
from .conversion import _copy, _moved
from .sync import SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

_PLAIN = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    layers.BatchNorm1d, layers.BatchNorm2d, layers.BatchNorm3d, layers.BatchNorm, SyncBatchNorm,
)  # fmt: skip
_TORCH_BASES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _swap(model: nn.Module, make, wanted) -> list[str]:
    """Replaces, in place, every module for which ``wanted(module)`` by ``make(module)``;
    returns the paths of the modules ``wanted`` said "kept" of."""
    kept = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = prefix + name
            verdict = wanted(child, path)
            if verdict is True:
                setattr(parent, name, make(child))
            else:
                if verdict == "kept":
                    kept.append(path)
                visit(child, path + ".")

    visit(model, "")
    return kept


def convert_sync_batchnorm(model: nn.Module, process_group=None, *, subclasses: bool = False) -> nn.Module:
    """A copy of ``model`` with its batch norm synchronized over ``process_group`` (see the module
    docstring); the input model is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refused = []

    def wanted(module: nn.Module, path: str):
        if type(module) in _PLAIN:
            return True
        if isinstance(module, layers._BatchNorm):
            refused.append(f"{path or '(the model)'} ({type(module).__name__})")
            return False
        if isinstance(module, _TORCH_BASES):
            return True if subclasses else "kept"
        return False

    wanted(model, "")
    for path, module in model.named_modules():
        if path:
            wanted(module, path)
    if refused:
        raise ValueError(
            "convert_sync_batchnorm has no synchronized form for " + ", ".join(refused) + ": fused layers can be "
            "converted with batchnorm.convert(model, fuse=False) first; ghost batch norm, batch renorm, lp batch "
            "norm and uninitialized lazy layers are not synchronized yet"
        )

    def make(module: nn.Module) -> nn.Module:
        axis = getattr(module, "axis", 1)
        target = _moved(module, SyncBatchNorm, **({"axis": axis} if axis != 1 else {}))
        target.process_group = process_group
        return target

    if type(model) in _PLAIN:
        return make(_copy(model))
    result = _copy(model)
    kept = _swap(result, make, lambda m, _path: wanted(m, _path))
    if kept:
        warnings.warn(
            f"convert_sync_batchnorm kept {len(kept)} subclass(es) of torch's batch norm ({', '.join(kept)}): their "
            "code is the user's, and they do not synchronize; pass subclasses=True to convert them as their torch "
            "base class",
            UserWarning,
            stacklevel=2,
        )
    return result


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every SyncBatchNorm this project's BatchNorm, state and axis kept."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    synced = (SyncBatchNorm, nn.SyncBatchNorm)

    def make(module: nn.Module) -> nn.Module:
        axis = getattr(module, "axis", 1)
        return _moved(module, layers.BatchNorm, **({"axis": axis} if axis != 1 else {}))

    if isinstance(model, synced):
        return make(_copy(model))
    result = _copy(model)
    _swap(result, make, lambda m, _path: isinstance(m, synced))
    return result
