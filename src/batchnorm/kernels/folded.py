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
from numba import njit

from .cpu import (
    _at,
    _backward_coefficients,
    _centered_affine_rows,
    _channel_sums_rows,
    _eval_scale,
    _finish_chunks,
    _serial,
    _two_term_rows,
    _up,
    _update_after,
)


@njit(**_serial)
def _spread(values, B):
    """Per-column values of (A, C * B) data: each of the C per-channel values B times."""
    return np.repeat(values, B)


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
def forward_train_folded(x, weight, bias, eps, y, mean_out, invstd_out, var_out, threads, nontemporal):
    """Algorithm 1 on (A, C, B) data as (A, C * B): per-column sums around each channel's
    first value, added per channel into the statistics, then the map with per-column values."""
    A, C, B = x.shape
    columns = x.reshape((A, C * B))
    shift = np.empty_like(mean_out)
    for c in range(C):
        shift[c] = _up(x[0, c, 0])
    first, second = _channel_sums_rows(columns, _spread(shift, B), None, threads)
    scale = _finish_chunks(shift, _fold(first, B), _fold(second, B), A * B, eps, weight, mean_out, invstd_out, var_out)
    _centered_affine_rows(
        columns, _spread(mean_out, B), _spread(scale, B), _spread(bias, B), y.reshape((A, C * B)), threads, nontemporal
    )


@njit(**_serial)
def forward_eval_folded(x, running_mean, running_var, weight, bias, eps, y, threads, nontemporal):
    """The affine map of Algorithm 2 on (A, C, B) data as (A, C * B), per-column values."""
    A, C, B = x.shape
    mean, scale = _eval_scale(running_mean, running_var, weight, eps)
    _centered_affine_rows(
        x.reshape((A, C * B)), _spread(mean, B), _spread(scale, B), _spread(bias, B), y.reshape((A, C * B)),
        threads, nontemporal,
    )  # fmt: skip


@njit(**_serial)
def backward_folded(dy, x, mean, invstd, weight, training, dx, dweight, dbias, threads, nontemporal):
    """Gradients on (A, C, B) data as (A, C * B); formulas of cpu.backward_channels."""
    A, C, B = x.shape
    columns, dy_columns, center = x.reshape((A, C * B)), dy.reshape((A, C * B)), _spread(mean, B)
    first, second = _channel_sums_rows(columns, center, dy_columns, threads)
    dy_scale, x_scale, const = _backward_coefficients(
        _fold(first, B), _fold(second, B), invstd, weight, training, A * B, dweight, dbias
    )
    if dx.shape[0] == 0:
        return
    _two_term_rows(
        dy_columns, columns, center, _spread(dy_scale, B), _spread(x_scale, B), _spread(const, B),
        dx.reshape((A, C * B)), threads, nontemporal,
    )  # fmt: skip


# ----------------------------------------------------- by address, as cpu.py's


@njit(**_serial)
def forward_train_folded_at(
    x, weight, bias, y, mean, invstd, var, A, C, B, eps, threads, nontemporal, zero, stored,
    running_mean, running_var, counter, momentum,
):  # fmt: skip
    """forward_train_folded; statistics, update and result as cpu.forward_train_channels_at."""
    forward_train_folded(
        _at(x, (A, C, B), stored), _at(weight, C, zero), _at(bias, C, zero), eps, _at(y, (A, C, B), stored),
        _at(mean, C, zero), _at(invstd, C, zero), _at(var, C, zero), threads, nontemporal,
    )  # fmt: skip
    return _update_after(running_mean, running_var, counter, mean, var, C, A * B, momentum, zero)


@njit(**_serial)
def forward_eval_folded_at(
    x, running_mean, running_var, weight, bias, y, A, C, B, eps, threads, nontemporal, zero, stored
):
    forward_eval_folded(
        _at(x, (A, C, B), stored), _at(running_mean, C, zero), _at(running_var, C, zero), _at(weight, C, zero),
        _at(bias, C, zero), eps, _at(y, (A, C, B), stored), threads, nontemporal,
    )  # fmt: skip


@njit(**_serial)
def backward_folded_at(
    dy, x, mean, invstd, weight, training, dx, dweight, dbias, A, C, B, threads, nontemporal, zero, stored
):
    """backward_folded; no dx when its address is 0 (an empty array stands in)."""
    dx_array = _at(dx if dx != 0 else x, (A if dx != 0 else 0, C, B), stored)
    backward_folded(
        _at(dy, (A, C, B), stored), _at(x, (A, C, B), stored), _at(mean, C, zero), _at(invstd, C, zero),
        _at(weight, C, zero), training, dx_array, _at(dweight, C, zero), _at(dbias, C, zero), threads, nontemporal,
    )  # fmt: skip
