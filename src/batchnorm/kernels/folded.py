"""Kernels for NCHW-like data with short rows: (A, C, B) taken as (A, C * B).

With rows of a few values (2x2 or 4x4 feature maps, short 1-D signals) the memory-order
kernels of cpu.py handle each row of B values on its own: a short loop, and no vector
is ever full. Here the same memory is read as A rows of C * B columns, and the kernels
of channels_last data (cpu.py, ``_rows``), vectorized across columns, run on it with
per-column values: each channel's value repeated B times (_spread). Their per-column
sums are then added per channel (_fold), so the statistics, the formulas and the
rounding are those of the channels_last kernels, with B times as many columns.

launch.py sends data here when launch.folds says so (short rows, not too many columns,
enough rows); measurements in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
from numba import literally, njit, types
from numba.extending import overload

from .activation import IDENTITY
from .cpu import (
    _backward_coefficients,
    _centered_affine_rows,
    _channel_sums_rows,
    _eval_scale,
    _finish_chunks,
    _law,
    _serial,
    _two_term_rows,
    _up,
)


@njit(**_serial)
def _spread(values, B):
    """Per-column values of (A, C * B) data: each of the C per-channel values B times."""
    return np.repeat(values, B)


def _columns(t, A, columns):
    """(A, C, B) data as (A, C * B); None stays None (no residual)."""


@overload(_columns, jit_options=_serial)
def _columns_overload(t, A, columns):
    if isinstance(t, types.NoneType):
        return lambda t, A, columns: None
    return lambda t, A, columns: t.reshape((A, columns))


def _spread_law(law, B):
    """cpu._law's per-channel arrays as per-column ones (_spread); None stays None."""


@overload(_spread_law, jit_options=_serial)
def _spread_law_overload(law, B):
    if isinstance(law, types.NoneType):
        return lambda law, B: None
    return lambda law, B: (_spread(law[0], B), _spread(law[1], B), law[2], law[3], _spread(law[4], B))


@njit(**_serial)
def _fold(sums, B):
    """(chunks, C * B) per-column sums as (chunks * B, C): rows whose per-channel sum
    (over axis 0, as _finish_chunks and _backward_coefficients add chunks) is the channel's."""
    chunks, columns = sums.shape
    C = columns // B
    folded = np.empty((chunks * B, C))
    for t in range(chunks):
        for c in range(C):
            for b in range(B):
                folded[t * B + b, c] = sums[t, c * B + b]
    return folded


@njit(**_serial)
def forward_train_folded(
    x, weight, bias, eps, y, mean_out, invstd_out, var_out, threads, nontemporal, act, slope, alpha, residual
):
    """Algorithm 1 on (A, C, B) data as (A, C * B): per-column sums around each channel's
    first value, added per channel into the statistics, then the map with per-column values
    (a fused layer's: act(y + residual))."""
    literally(act)
    A, C, B = x.shape
    columns = x.reshape((A, C * B))
    shift = np.empty_like(mean_out)
    for c in range(C):
        shift[c] = _up(x[0, c, 0])
    first, second = _channel_sums_rows(columns, _spread(shift, B), None, threads, IDENTITY, None, None)
    scale = _finish_chunks(shift, _fold(first, B), _fold(second, B), A * B, eps, weight, mean_out, invstd_out, var_out)
    _centered_affine_rows(
        columns, _spread(mean_out, B), _spread(scale, B), _spread(bias, B), y.reshape((A, C * B)), threads, nontemporal,
        act, slope, alpha, _columns(residual, A, C * B),
    )  # fmt: skip


@njit(**_serial)
def forward_eval_folded(
    x, running_mean, running_var, weight, bias, eps, y, threads, nontemporal, act, slope, alpha, residual
):
    """The affine map of Algorithm 2 on (A, C, B) data as (A, C * B), per-column values."""
    literally(act)
    A, C, B = x.shape
    mean, scale = _eval_scale(running_mean, running_var, weight, eps)
    _centered_affine_rows(
        x.reshape((A, C * B)), _spread(mean, B), _spread(scale, B), _spread(bias, B), y.reshape((A, C * B)),
        threads, nontemporal, act, slope, alpha, _columns(residual, A, C * B),
    )  # fmt: skip


@njit(**_serial)
def backward_folded(
    dy, x, mean, invstd, weight, training, dx, dweight, dbias, threads, nontemporal, bias, act, slope, alpha,
    residual, dresidual,
):  # fmt: skip
    """Gradients on (A, C, B) data as (A, C * B); formulas of cpu.backward_channels."""
    literally(act)
    A, C, B = x.shape
    columns, dy_columns, center = x.reshape((A, C * B)), dy.reshape((A, C * B)), _spread(mean, B)
    law = _spread_law(_law(act, weight, invstd, bias, slope, alpha), B)
    residual_columns = _columns(residual, A, C * B)
    first, second = _channel_sums_rows(columns, center, dy_columns, threads, act, law, residual_columns)
    dy_scale, x_scale, const = _backward_coefficients(
        _fold(first, B), _fold(second, B), invstd, weight, training, A * B, dweight, dbias
    )
    if dx.shape[0] == 0:
        return
    _two_term_rows(
        dy_columns, columns, center, _spread(dy_scale, B), _spread(x_scale, B), _spread(const, B),
        dx.reshape((A, C * B)), threads, nontemporal, act, law, residual_columns, _columns(dresidual, A, C * B),
    )  # fmt: skip
