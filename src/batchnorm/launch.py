"""The Numba kernels called on CPU tensors: the checks they cannot make, then addresses.

Every kernel here (kernels/addressed.py, a set for each fused epilogue) receives its tensors as
data addresses and the (A, C, B) shape of layout.py. On the development machine a
numpy view of a tensor took 1.5 to 5 us to make and the old array launch spent about
60 us in Python around a 20 us kernel; an integer argument costs a fraction of a
microsecond. Since the kernels trust what they get, everything is checked here: an
input with dense memory (or a dense copy), per-channel tensors dense with one value of
the compute dtype per channel (or converted), outputs allocated here with the input's
strides. Half-precision data goes to the kernels as it is, and they widen it to float32
as they load it (STORED). Every tensor whose address a kernel gets is held by a
local variable until the kernel returns: ``per_channel(t).data_ptr()`` written inline
would hand over the memory of a converted copy already freed.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch

from . import crossover
from .buffers import pool
from .kernels import addressed, cpu
from .kernels.activation import CODES, FROM_OUTPUT, IDENTITY
from .kernels.reference import compute_dtype
from .layout import channel_view

Tensor = torch.Tensor

# the compute dtype of the statistics and per-channel tensors, as the kernels get it
ZERO = {torch.float32: np.float32(0), torch.float64: np.float64(0)}
# the type of the data as the kernels get it: Numba has no float16 and numpy no
# bfloat16, so half precision goes as its bits, the integer type naming the format
# (kernels/cpu.py, "half precision")
STORED = {
    torch.float32: np.float32(0),
    torch.float64: np.float64(0),
    torch.float16: np.int16(0),
    torch.bfloat16: np.uint16(0),
}

_local = threading.local()


def sync_threads() -> int:
    """Give Numba torch's thread count, so that both use the same OpenMP team size.

    Numba's count is per Python thread, and so is what this remembers of it: the call
    into Numba (about 1.3 us) happens only when torch's count changes. torch sets 1
    thread in DataLoader workers; following it keeps them off the parent's pool.
    """
    wanted = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if getattr(_local, "threads", 0) != wanted:
        numba.set_num_threads(wanted)
        _local.threads = wanted
    return wanted


def cache_size_bytes(text: str) -> int:
    """A sysfs cache size ("48K", "32M" or plain bytes) in bytes."""
    text = text.strip()
    unit = {"K": 1024, "M": 1024**2}.get(text[-1:])
    return int(text) if unit is None else int(text[:-1]) * unit


def last_level_cache_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest cache of CPU 0 in bytes, from sysfs (``index*/size``); 32 MiB when unknown."""
    sizes = []
    try:
        for entry in os.listdir(base):
            if entry.startswith("index"):
                with open(os.path.join(base, entry, "size")) as handle:
                    sizes.append(cache_size_bytes(handle.read()))
    except (OSError, ValueError):
        return 32 * 1024**2
    return max(sizes) if sizes else 32 * 1024**2


# NCHW-like data (B > 1) goes to the kernels in memory order (cpu.forward_train_stream,
# cpu.backward_stream) when its rows are shorter than cpu.PREFETCH_ROW_BYTES and the tensor
# takes at most STREAM_MAX_BYTES, so that the second pass finds the input in the
# last-level cache (the backward's two inputs together fill it); else to the channel-major
# kernels. See cpu.py for the measurements.
STREAM_MAX_BYTES = last_level_cache_bytes() // 2


# The map passes store their output past the caches (cpu.py, "non-temporal stores") when
# the tensors a call reads and writes take at least NONTEMPORAL_MIN_BYTES together: the
# output cannot stay in the last-level cache, and not reading its lines before writing
# them saves a pass over memory. The kernels then write whole cache lines only: each row
# (B values, or C when B == 1) must be whole lines from a line boundary; else (rows of
# 14 x 14 values, say) the plain stores stay, since a line written partly past the caches
# and partly through them cost 2 to 3 times more than either.
NONTEMPORAL_MIN_BYTES = last_level_cache_bytes()


def _past_caches(tensors: int, out: Tensor, C: int, B: int) -> bool:
    """Whether a call that reads and writes ``tensors`` tensors the size of ``out`` (its output)
    stores that output past the caches."""
    row_bytes = (C if B == 1 else B) * out.element_size()
    return (
        tensors * out.numel() * out.element_size() >= NONTEMPORAL_MIN_BYTES
        and row_bytes % CACHE_LINE == 0
        and out.data_ptr() % CACHE_LINE == 0
    )


def _in_memory_order(A: int, C: int, B: int, itemsize: int) -> bool:
    return B * itemsize < cpu.PREFETCH_ROW_BYTES and A * C * B * itemsize <= STREAM_MAX_BYTES


# NCHW-like data with short rows can go to the kernels of kernels/folded.py, which read
# (A, C, B) as (A, C * B) with channels_last's kernels: rows of at most one cache line
# (3x3 float32 maps, 4x4 at most) with at least FOLD_MIN_ROWS_PER_VALUE * B rows (the
# per-column work is paid once a call, the per-row work of the other kernels once a row).
# Whether folding wins depends on the machine: the C * B per-column values crowd the caches,
# and how soon depends on their sizes and on how well the other kernels vectorize short
# rows. On a 2-core AMD EPYC (48 KiB L1d, AVX-512) rows of 2x2 float32 folded faster up to
# 128 KiB of columns, 3x3 up to 56 KiB and not at 112 KiB, 4x4 only up to 4 KiB, where the
# machine these limits were first measured on (FOLD_LIMITS of earlier versions) folded 4x4
# up to 16 KiB. So the column limit is measured, per row length, the first time a row
# length asks (crossover.py, about 30 ms): folded against the maps kernels, a training
# forward, at FOLD_COLUMN_BYTES.
FOLD_MIN_ROWS_PER_VALUE = 4
FOLD_OVERRIDE: bool | None = None  # True: every B > 1 folds, False: none (tests); None: measured
FOLD_COLUMN_BYTES = tuple(1 << k for k in range(12, 18))  # 4 KiB to 128 KiB of columns


def _line_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache/index0/coherency_line_size") -> int:
    try:
        with open(base) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 64


CACHE_LINE = _line_bytes()


def folds(A: int, C: int, B: int, itemsize: int) -> bool:
    """Whether (A, C, B) data of ``itemsize``-byte values (B > 1) goes to the folded kernels."""
    if FOLD_OVERRIDE is not None:
        return FOLD_OVERRIDE
    row = B * itemsize
    if row > CACHE_LINE or A < FOLD_MIN_ROWS_PER_VALUE * B:
        return False
    columns = C * B * max(itemsize, 4)
    if columns < FOLD_COLUMN_BYTES[0]:
        return True
    key = ("fold", row, itemsize, sync_threads())
    return columns < crossover.threshold(key, _fold_sides, FOLD_COLUMN_BYTES)


def _fold_sides(key: tuple):
    """(maps kernels, folded kernels) for crossover.measure, on (A, C, B) float data with
    rows of the key's bytes and C * B * 4 bytes of columns (the size measured)."""
    _fold, row, itemsize, _threads = key
    dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[itemsize]
    B = row // itemsize

    def side(kind: str):
        def prepare(columns: int):
            C = max(1, columns // (B * max(itemsize, 4)))
            x = torch.randn(max(64, FOLD_MIN_ROWS_PER_VALUE * B), C, B, dtype=dtype)
            stats = torch.empty(3, C, dtype=compute_dtype(dtype))  # held by the call: the kernel writes there

            def call(stats=stats):
                mean, step = stats.data_ptr(), stats.stride(0) * stats.element_size()
                return train(x, None, None, 1e-5, 1, mean, mean + step, mean + 2 * step, kind=kind)

            return call

        return prepare

    return side("stream" if _in_memory_order(1, 1, B, itemsize) else "channels"), side("folded")


def family(A: int, C: int, B: int, itemsize: int) -> str:
    """Which kernels take (A, C, B) data: "rows" (B == 1), "folded", "stream" or "channels"."""
    if B == 1:
        return "rows"
    if folds(A, C, B, itemsize):
        return "folded"
    return "stream" if _in_memory_order(A, C, B, itemsize) else "channels"


_PLAIN = addressed.kernels(IDENTITY, False)


def _epilogue(epilogue, x: Tensor, backward: bool = False):
    """(kernel set, residual tensor walked like x or None, slope, alpha, plain) for a fused
    layer's epilogue (epilogue.Epilogue; None for the plain layer); the backward of one that
    saves its output (in-place activated batch norm) takes x-hat from that output."""
    if epilogue is None:
        return _PLAIN, None, 0.0, 0.0, True
    act, residual = CODES[epilogue.activation], epilogue.residual
    if backward and epilogue.save == "output":
        act += FROM_OUTPUT
    if residual is not None and (residual.dtype is not x.dtype or residual.stride() != x.stride()):
        residual = pool.empty_like(x).copy_(residual)  # the kernels walk residual and x alike
    plain = act == IDENTITY and residual is None
    sets = _PLAIN if plain else addressed.kernels(act, residual is not None)
    return sets, residual, float(epilogue.negative_slope), float(epilogue.alpha), plain


def _rows_of(family: str, C: int, B: int) -> tuple[int, int]:
    """(C, B) as the family's kernels walk the data: the folded ones as C * B columns."""
    return (C * B, 1) if family == "folded" else (C, B)


_SHAPES: dict[tuple, tuple[int, int, int] | None] = {}
_UNSEEN = ()  # not a shape: the key has not been looked at yet


def dense_shape(x: Tensor, axis: int) -> tuple[int, int, int] | None:
    """(A, C, B) of ``x``'s memory around ``axis`` (layout.channel_view), None if it has
    gaps; remembered per (shape, strides, axis), since working it out costs microseconds."""
    key = (x.shape, x.stride(), axis)
    shape = _SHAPES.get(key, _UNSEEN)
    if shape is not _UNSEEN:
        return shape
    view = channel_view(x, axis)
    shape = None if view is None else tuple(view.shape)
    if len(_SHAPES) > 1024:
        _SHAPES.clear()
    _SHAPES[key] = shape
    return shape


def kernel_input(input: Tensor, axis: int) -> tuple[Tensor, tuple[int, int, int]]:
    """``input`` itself when its memory is dense, else a contiguous copy; with its (A, C, B)."""
    shape = dense_shape(input, axis)
    if shape is not None:
        return input, shape
    x = input.contiguous()
    return x, dense_shape(x, axis)


def dense(t: Tensor, dtype: torch.dtype, channels: int) -> bool:
    return t.dtype is dtype and t.numel() == channels and t.is_contiguous()


_FILLED: dict[tuple, Tensor] = {}


def per_channel(t: Tensor | None, dtype: torch.dtype, fill: float, channels: int) -> Tensor:
    """A per-channel tensor as ``channels`` dense values of ``dtype``; None (no affine
    weight or bias) gives a shared tensor of ``fill``, which the kernels only read."""
    if t is None:
        key = (dtype, fill, channels)
        filled = _FILLED.get(key)
        if filled is None:
            if len(_FILLED) > 256:
                _FILLED.clear()
            filled = _FILLED[key] = torch.full((channels,), fill, dtype=dtype)
        return filled
    if not dense(t, dtype, channels):
        t = t.detach().to(dtype).contiguous()
    return t


def in_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``y`` itself when of ``dtype``, else a converted copy."""
    return y if y.dtype is dtype else y.to(dtype)


def running_addresses(running, dtype: torch.dtype, channels: int) -> tuple[int, int, int] | None:
    """Addresses of (running_mean, running_var, num_batches_tracked) for the kernels' running
    update, the counter's 0 when there is none; None when the buffers are not ``channels``
    dense values of ``dtype`` (the counter one int64), which the torch-ops update takes.

    ``running`` is (running_mean, running_var, num_batches_tracked, count, momentum,
    correction); momentum < 0 (the cumulative average) needs the counter.
    """
    running_mean, running_var, num_batches_tracked, _count, momentum, _correction = running
    # dense() written out: this runs on every training call of every layer
    if not (
        running_mean.dtype is dtype and running_mean.numel() == channels and running_mean.is_contiguous()
        and running_var.dtype is dtype and running_var.numel() == channels and running_var.is_contiguous()
    ):  # fmt: skip
        return None
    if num_batches_tracked is None:
        if momentum < 0:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        return running_mean.data_ptr(), running_var.data_ptr(), 0
    # one int64 (a tensor of one value is contiguous whatever its strides)
    if num_batches_tracked.dtype is not torch.int64 or num_batches_tracked.numel() != 1:
        return None
    return running_mean.data_ptr(), running_var.data_ptr(), num_batches_tracked.data_ptr()


# dtype: cpu.update_running_stats_at compiled for it (from Numba's cache when it has it) on
# first use, then called as that function, without the dispatcher's typing of each
# argument: in a training step of the paper's MLP the step took 0.8% to 1.6% less
_UPDATES: dict = {}


def _compiled_update(dtype: torch.dtype):
    update = _UPDATES.get(dtype)
    if update is None:
        update = _UPDATES[dtype] = cpu.update_running_stats_at.compile(cpu.update_at_signature(ZERO[dtype]))
    return update


def update_running(running, mean: Tensor, spread: Tensor, spread_is_invstd: bool, eps: float) -> bool | None:
    """The running update from one CPU batch's mean and biased var (or torch's 1/sqrt(var + eps)),
    ``running`` as in running_addresses. Returns whether it was made (False: the statistics were
    not finite and nothing changed), or None when the kernel does not take these tensors
    (half-precision buffers, mixed dtypes, buffers with gaps): the caller updates in torch ops.

    ``mean`` and ``spread`` must be dense, one value per channel, of one dtype (the callers'
    own statistics, or checked by the op); the buffers are checked by running_addresses.
    """
    dtype = mean.dtype
    update = _UPDATES.get(dtype)
    if update is None:
        if dtype not in ZERO:
            return None
        update = _compiled_update(dtype)
    channels = mean.numel()
    buffers = running_addresses(running, dtype, channels)
    if buffers is None:
        return None
    return update(
        *buffers, mean.data_ptr(), spread.data_ptr(), spread_is_invstd, channels, eps, running[3], running[4],
        running[5], 0.0,
    )  # fmt: skip


def train(
    input: Tensor, weight, bias, eps: float, axis: int, mean: int, invstd: int, var: int, running=None, kind=None,
    epilogue=None,
):  # fmt: skip
    """Algorithm 1 on a non-empty input; the batch mean, invstd and biased var are written
    to the addresses given, each ``C`` values of the compute dtype (float32 for half).

    With ``running`` (as in running_addresses) whose buffers running_addresses takes, the
    kernel call also makes the running update. Returns (y, updated): ``updated`` is None
    when no update was made (no ``running``, or buffers left to the caller), else whether
    it was made (False: the statistics were not finite and nothing changed). ``kind``
    names the kernel family instead of ``family``'s choice (crossover measurements). With an
    ``epilogue`` (epilogue.Epilogue) y is a fused layer's output, act(BN(x) + residual).
    """
    threads = sync_threads()
    x, (A, C, B) = kernel_input(input, axis)
    sets, residual, slope, alpha, plain = _epilogue(epilogue, x)
    y = pool.empty_like(x)
    dtype = compute_dtype(x.dtype)
    w, b = per_channel(weight, dtype, 1.0, C), per_channel(bias, dtype, 0.0, C)
    buffers = None if running is None else running_addresses(running, dtype, C)
    running_mean, running_var, counter = buffers or (0, 0, 0)
    momentum, correction = (float(running[4]), running[5]) if buffers else (0.0, 1)
    kind = kind or family(A, C, B, x.element_size())
    updated = sets["forward_train_" + kind](
        x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), mean, invstd, var, A, C, B, float(eps), threads,
        plain and _past_caches(2, y, *_rows_of(kind, C, B)), ZERO[dtype], STORED[x.dtype],
        running_mean, running_var, counter, momentum, correction, 0 if residual is None else residual.data_ptr(),
        slope, alpha,
    )  # fmt: skip
    return y, (updated if buffers else None)


def evaluate(input: Tensor, running_mean, running_var, weight, bias, eps: float, axis: int, epilogue=None) -> Tensor:
    """The affine map of Algorithm 2 on a non-empty input (with an ``epilogue``, a fused layer's
    act(y + residual))."""
    threads = sync_threads()
    x, (A, C, B) = kernel_input(input, axis)
    sets, residual, slope, alpha, plain = _epilogue(epilogue, x)
    y = pool.empty_like(x)
    dtype = compute_dtype(x.dtype)
    rm, rv = per_channel(running_mean, dtype, 0.0, C), per_channel(running_var, dtype, 1.0, C)
    w, b = per_channel(weight, dtype, 1.0, C), per_channel(bias, dtype, 0.0, C)
    kind = family(A, C, B, x.element_size())
    sets["forward_eval_" + kind](
        x.data_ptr(), rm.data_ptr(), rv.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), A, C, B, float(eps),
        threads, plain and _past_caches(2, y, *_rows_of(kind, C, B)), ZERO[dtype], STORED[x.dtype],
        0 if residual is None else residual.data_ptr(), slope, alpha,
    )  # fmt: skip
    return y


def backward(
    grad_output, input, mean: int, invstd: int, weight, training: bool, axis: int, input_grad: bool, bias=None,
    epilogue=None,
):  # fmt: skip
    """(dx, dgamma, dbeta) on a non-empty input, with the statistics at the addresses
    ``mean`` and ``invstd`` (``C`` values of the compute dtype each, float32 for half);
    dx is an empty tensor when ``input_grad`` is False, dgamma and dbeta are in the
    compute dtype. With an ``epilogue`` (a fused layer's, the forward's ``bias`` and
    residual), ``grad_output`` is the gradient of act(y + residual), and the result has a
    fourth tensor: the residual's gradient (None without a residual). With the epilogue's
    save="output", ``input`` is the layer's output, from which x-hat is recovered."""
    if epilogue is not None and epilogue.activation == "identity" and epilogue.save == "input":  # y + residual
        dx, dweight, dbias = backward(grad_output, input, mean, invstd, weight, training, axis, input_grad)
        return dx, dweight, dbias, (None if epilogue.residual is None else grad_output)
    threads = sync_threads()
    x, (A, C, B) = kernel_input(input, axis)
    sets, residual, slope, alpha, plain = _epilogue(epilogue, x, backward=True)
    dtype = compute_dtype(x.dtype)
    dy = grad_output
    if dy.dtype is not x.dtype or dy.stride() != x.stride():  # the kernels walk dy and x alike
        dy = pool.empty_like(x).copy_(dy)
    dweight, dbias = torch.empty(C, dtype=dtype), torch.empty(C, dtype=dtype)
    # through an activation the residual's gradient is written beside dx (which then has rows);
    # without one it is the output's gradient itself
    dresidual = None if residual is None or plain else pool.empty_like(x)
    dx = pool.empty_like(x) if input_grad or dresidual is not None else None
    w, b = per_channel(weight, dtype, 1.0, C), per_channel(bias, dtype, 0.0, C)
    kind = family(A, C, B, x.element_size())
    sets["backward_" + kind](
        dy.data_ptr(), x.data_ptr(), mean, invstd, w.data_ptr(), bool(training),
        0 if dx is None else dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), A, C, B, threads,
        plain and dx is not None and _past_caches(3, dx, *_rows_of(kind, C, B)), ZERO[dtype], STORED[x.dtype],
        b.data_ptr(), 0 if residual is None else residual.data_ptr(),
        0 if dresidual is None else dresidual.data_ptr(), slope, alpha,
    )  # fmt: skip
    dx = dx if input_grad else input.new_empty(0)
    if epilogue is None:
        return dx, dweight, dbias
    return dx, dweight, dbias, dresidual
