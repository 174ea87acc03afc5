"""The kernels by address: what launch.py calls, one set per fused epilogue.

A numpy view of a tensor costs 1.5 to 5 us to make, an address a fraction of one, so
launch.py hands the kernels (kernels/cpu.py, kernels/folded.py) data addresses and the
(A, C, B) shape of layout.py; the functions here make the arrays and call them. The
``rows`` kernels take B == 1 data as (A, C), the others (A, C, B). The data (x, y, dy,
dx, the residual and its gradient) holds values of ``stored``'s type (half precision as
its bits), the per-channel tensors C values of the compute dtype, ``zero``'s.

``kernels(activation, residual)`` returns the set for one epilogue: the activation code
(kernels/activation.py) is a constant of the functions made for it, which the kernels
take as a compile-time constant (one specialization each, no branch in the loops), and
so is whether a residual is added. The plain layer's set is ``kernels(IDENTITY, False)``.
Each function compiles on its first call (from Numba's cache when it has it), so a first
call compiles only the kernels its layout and epilogue use.
"""

from __future__ import annotations

from numba import njit

from . import cpu, folded
from .activation import IDENTITY, like
from .cpu import _at, _serial, _update_after

# the kernel families (launch.family); evaluation is one pass, which the channel kernels
# already make in memory order, so stream data is evaluated by them
FAMILIES = ("channels", "stream", "rows", "folded")
CHANNELS, STREAM, ROWS, FOLDED = range(len(FAMILIES))
# The functions below are closures over integers only (Numba's cache keys a closure by the
# values it closes over, and a dispatcher's key changed from process to process: each
# process compiled them again); the branches on those integers are pruned as they compile.

_SETS: dict[tuple[int, bool], dict[str, object]] = {}


def kernels(activation: int, residual: bool) -> dict[str, object]:
    """{"forward_train_<family>", "forward_eval_<family>", "backward_<family>": function}
    for each family of FAMILIES, made once per (activation, residual)."""
    key = (activation, residual)
    found = _SETS.get(key)
    if found is None:
        found = _SETS[key] = {}
        for family, name in enumerate(FAMILIES):
            found["forward_train_" + name] = _forward_train(family, activation, residual)
            found["forward_eval_" + name] = _forward_eval(family, activation, residual)
            found["backward_" + name] = _backward(family, activation, residual)
    return found


def _forward_train(family: int, act: int, has_residual: bool):
    rows = family == ROWS

    @njit(**_serial)
    def forward_train(
        x, weight, bias, y, mean, invstd, var, A, C, B, eps, threads, nontemporal, zero, stored,
        running_mean, running_var, counter, momentum, correction, residual, slope, alpha,
    ):  # fmt: skip
        """The family's forward_train; the statistics go to mean, invstd and var, then the running update
        (cpu.update_running_stats_at) unless ``running_mean`` is 0 (one call from Python
        instead of two). Returns False when the update was refused (statistics not finite)."""
        shape = (A, C) if rows else (A, C, B)
        r = _at(residual, shape, stored) if has_residual else None
        arguments = (
            _at(x, shape, stored), _at(weight, C, zero), _at(bias, C, zero), eps, _at(y, shape, stored),
            _at(mean, C, zero), _at(invstd, C, zero), _at(var, C, zero), threads, nontemporal,
            act, like(slope, zero), like(alpha, zero), r,
        )  # fmt: skip
        if family == CHANNELS:
            cpu.forward_train_channels(*arguments)
        elif family == STREAM:
            cpu.forward_train_stream(*arguments)
        elif family == ROWS:
            cpu.forward_train_rows(*arguments)
        else:
            folded.forward_train_folded(*arguments)
        return _update_after(running_mean, running_var, counter, mean, var, C, A * B, momentum, correction, zero)

    return forward_train


def _forward_eval(family: int, act: int, has_residual: bool):
    rows = family == ROWS

    @njit(**_serial)
    def forward_eval(
        x, running_mean, running_var, weight, bias, y, A, C, B, eps, threads, nontemporal, zero, stored,
        residual, slope, alpha,
    ):  # fmt: skip
        shape = (A, C) if rows else (A, C, B)
        r = _at(residual, shape, stored) if has_residual else None
        arguments = (
            _at(x, shape, stored), _at(running_mean, C, zero), _at(running_var, C, zero), _at(weight, C, zero),
            _at(bias, C, zero), eps, _at(y, shape, stored), threads, nontemporal,
            act, like(slope, zero), like(alpha, zero), r,
        )  # fmt: skip
        if family == ROWS:
            cpu.forward_eval_rows(*arguments)
        elif family == FOLDED:
            folded.forward_eval_folded(*arguments)
        else:
            cpu.forward_eval_channels(*arguments)

    return forward_eval


def _backward(family: int, act: int, has_residual: bool):
    rows = family == ROWS
    # the residual's gradient is the activation's input gradient; with identity it is the
    # output's gradient itself, which the caller passes on without a kernel writing a copy
    has_dresidual = has_residual and act != IDENTITY

    @njit(**_serial)
    def backward(
        dy, x, mean, invstd, weight, training, dx, dweight, dbias, A, C, B, threads, nontemporal, zero, stored,
        bias, residual, dresidual, slope, alpha,
    ):  # fmt: skip
        """The family's backward; no dx when its address is 0 (an empty array stands in)."""
        shape = (A, C) if rows else (A, C, B)
        empty = (0, C) if rows else (0, C, B)
        dx_array = _at(dx, shape, stored) if dx != 0 else _at(x, empty, stored)
        r = _at(residual, shape, stored) if has_residual else None
        dr = _at(dresidual, shape, stored) if has_dresidual else None
        arguments = (
            _at(dy, shape, stored), _at(x, shape, stored), _at(mean, C, zero), _at(invstd, C, zero),
            _at(weight, C, zero), training, dx_array, _at(dweight, C, zero), _at(dbias, C, zero), threads,
            nontemporal, _at(bias, C, zero), act, like(slope, zero), like(alpha, zero), r, dr,
        )  # fmt: skip
        if family == CHANNELS:
            cpu.backward_channels(*arguments)
        elif family == STREAM:
            cpu.backward_stream(*arguments)
        elif family == ROWS:
            cpu.backward_rows(*arguments)
        else:
            folded.backward_folded(*arguments)

    return backward
