"""CPU kernels for batch normalization, written with Numba.

Every kernel sees its data as a dense 3-D array ``(A, C, B)`` laid out in memory
as C order: ``A`` is the product of the dimensions outside the channel axis (in
memory order), ``C`` the channels, ``B`` the product of the dimensions inside it.
A contiguous NCHW tensor is ``(N, C, H*W)``; a channels_last tensor is
``(N*H*W, C, 1)``, which the ``_rows`` kernels take as a 2-D ``(A, C)`` array
and split into ``threads`` chunks of rows. Data with B > 1 goes to the ``_channels``
kernels (one channel per task, normalized while it is in cache) or, with short rows in
a tensor that fits in the last-level cache, to the ``_stream`` kernels (two passes in
memory order); launch.py chooses. No layout is copied to suit a kernel, and no dtype:
float16 and bfloat16 data is read and written as it is and computed in float32 (see
"half precision"). The map passes store their output past the caches when the call's
tensors fill the last-level cache (see "non-temporal stores").

Statistics accumulate in float64 around a per-channel shift ``K`` (the
channel's first value), short runs of values summed in the compute dtype first
(see "channel sums"), so that

    var = (1/m) sum (x - K)^2 - ((1/m) sum (x - K))^2

keeps its precision when the mean is large against the standard deviation,
where the naive ``E[x^2] - E[x]^2`` in the input precision loses it.

``fastmath`` allows reassociation (so that the reductions vectorize) but not
``nnan``/``ninf``: a NaN in the input must reach the statistics, where
``update_running_stats`` sees it and refuses the update.
"""

from __future__ import annotations

import math
import os

import numpy as np
from llvmlite import ir
from numba import carray, literally, njit, prange, typeof, types
from numba.extending import intrinsic, overload

from .activation import FROM_OUTPUT, IDENTITY, activate, derivative, inverse, like

# reassoc lets LLVM vectorize the float64 reductions; no nnan/ninf (see above).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_parallel = dict(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
_serial = dict(fastmath=FASTMATH, cache=True, nogil=True)


@njit(**_serial)
def _finish_stats(shift, total, total_sq, m, eps):
    """mean, biased var and 1/sqrt(var + eps) from shifted float64 sums."""
    mean_shifted = total / m
    var = max(total_sq / m - mean_shifted * mean_shifted, 0.0)
    return shift + mean_shifted, var, 1.0 / math.sqrt(var + eps)


# ------------------------------------------------------------------ half precision
#
# Numba has no float16 on the CPU and numpy no bfloat16, so half-precision data comes
# to the kernels as arrays of its bits, the integer type naming the format: float16 as
# int16, bfloat16 as uint16 (STORED in launch.py). A value is widened to float32 as it
# is loaded (_up) and rounded back as it is stored (_down), so the data crosses memory
# at 2 bytes a value; the statistics, coefficients and arithmetic are float32 (the
# compute dtype of every per-channel array), as in torch's half-precision kernels.
# float16 converts with LLVM's fpext/fptrunc (F16C's vcvtph2ps/vcvtps2ph on x86);
# bfloat16 is the top half of a float32, rounded to nearest even as c10::BFloat16 does.

BFLOAT16_NAN = 0x7FC0
HALF_FORMATS = (types.int16, types.uint16)  # float16, bfloat16


def _shaped(element, like):
    """``element`` (an LLVM type), or a vector of it with as many lanes as ``like`` has."""
    return ir.VectorType(element, like.type.count) if isinstance(like.type, ir.VectorType) else element


def _constant(type_, value):
    return ir.Constant(type_, [value] * type_.count if isinstance(type_, ir.VectorType) else value)


def _widen(builder, bits, stored):
    """float32 value(s) from the 16-bit ``bits`` (scalar or vector) of format ``stored``."""
    if stored == types.int16:
        return builder.fpext(builder.bitcast(bits, _shaped(ir.HalfType(), bits)), _shaped(ir.FloatType(), bits))
    wide = builder.zext(bits, _shaped(ir.IntType(32), bits))
    wide = builder.shl(wide, _constant(wide.type, 16))
    return builder.bitcast(wide, _shaped(ir.FloatType(), bits))


def _narrow(builder, value, stored):
    """The 16-bit bits of format ``stored`` of the float32 ``value`` (scalar or vector),
    rounded to nearest even; bfloat16 as c10::BFloat16 rounds, NaN to BFLOAT16_NAN."""
    half_bits = _shaped(ir.IntType(16), value)
    if stored == types.int16:
        return builder.bitcast(builder.fptrunc(value, _shaped(ir.HalfType(), value)), half_bits)
    bits = builder.bitcast(value, _shaped(ir.IntType(32), value))
    lowest_kept = builder.and_(builder.lshr(bits, _constant(bits.type, 16)), _constant(bits.type, 1))
    rounded = builder.add(bits, builder.add(lowest_kept, _constant(bits.type, 0x7FFF)))
    top = builder.trunc(builder.lshr(rounded, _constant(bits.type, 16)), half_bits)
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.select(is_nan, _constant(half_bits, BFLOAT16_NAN), top)


@intrinsic
def _half_to_float32(typingctx, bits):
    """The half-precision value whose bits are ``bits`` (int16: float16, uint16: bfloat16), as float32."""
    if bits not in HALF_FORMATS:
        return None

    def codegen(context, builder, signature, args):
        return _widen(builder, args[0], signature.args[0])

    return types.float32(bits), codegen


@intrinsic
def _float32_to_half(typingctx, value, like):
    """The bits of the float32 ``value`` in ``like``'s half-precision format (see _half_to_float32)."""
    if value != types.float32 or like not in HALF_FORMATS:
        return None

    def codegen(context, builder, signature, args):
        return _narrow(builder, args[0], signature.args[1])

    return like(value, like), codegen


def _up(value):
    """A loaded data value in the compute dtype: float32/float64 as they are, half-precision bits as float32."""


@overload(_up, jit_options=_serial)
def _up_overload(value):
    if isinstance(value, types.Float):
        return lambda value: value
    if value in HALF_FORMATS:
        return lambda value: _half_to_float32(value)
    return None


def _down(value, data):
    """``value`` as stored in the array ``data``: float32/float64 as it is (the store
    converts), float16 (int16) and bfloat16 (uint16) bits rounded to nearest even."""


@overload(_down, jit_options=_serial)
def _down_overload(value, data):
    if isinstance(data.dtype, types.Float):
        return lambda value, data: value
    if data.dtype in HALF_FORMATS:
        zero = np.int16(0) if data.dtype == types.int16 else np.uint16(0)
        return lambda value, data: _float32_to_half(np.float32(value), zero)
    return None


# ----------------------------------------------------------- software prefetch
#
# A channel of (A, C, B) data is A rows of B values, C * B values apart. When a row is
# shorter than a 4 KiB page, the hardware prefetcher (which stops at page boundaries and
# needs a few misses to find a stream) hardly starts before the row ends, and each row
# costs a memory latency. The channel kernels therefore ask for the lines of the row
# PREFETCH_ROWS ahead when a row takes less than PREFETCH_ROW_BYTES, the machine's page
# size (os.sysconf; 4 KiB when unknown). Measured on the
# development machine against the same kernels without it, in shuffled alternating
# rounds (docs/benchmarks.md): 32x256x14x14 (784-byte rows) forward+backward 1.12x to
# 1.23x faster, 64x32x28x28 1.03x; 64x64x32x32 (4 KiB rows) was 3% slower with it.
PREFETCH_ROWS = 4
PREFETCH_ROW_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@intrinsic
def _prefetch(typingctx, address):
    """llvm.prefetch (read, keep in all cache levels) of the line at the integer ``address``."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        # Numba's own void pointer: "ptr" (opaque, LLVM 15 and later) or "i8*" (typed),
        # which also names the intrinsic's overload
        pointer_type, i32 = context.get_value_type(types.voidptr), ir.IntType(32)
        pointer = builder.inttoptr(args[0], pointer_type)
        name = "llvm.prefetch.p0" if str(pointer_type) == "ptr" else "llvm.prefetch.p0i8"
        function = builder.module.globals.get(name)
        if function is None:
            signature_ir = ir.FunctionType(ir.VoidType(), [pointer_type, i32, i32, i32])
            function = ir.Function(builder.module, signature_ir, name)
        builder.call(function, [pointer, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(address), codegen


@njit(**_serial)
def _prefetch_bytes(x):
    """The bytes of each row the channel kernels prefetch: all of a short row, none of a
    row the hardware prefetcher follows."""
    row_bytes = x.shape[2] * x.itemsize
    return row_bytes if row_bytes < PREFETCH_ROW_BYTES else 0


@njit(**_serial)
def _prefetch_row(base, row, row_bytes):
    """Every 64-byte line of x[a, c, :], ``row`` = a * C + c, in the C-order (A, C, B) array
    at address ``base`` whose rows take ``row_bytes`` bytes; nothing when ``row_bytes`` is 0."""
    start = base + row * row_bytes
    for offset in range(0, row_bytes, 64):
        _prefetch(start + offset)


# ------------------------------------------------------------ non-temporal stores
#
# A store to a line not in cache first reads the line (read for ownership), so writing an
# output costs two passes over memory, not one. When the output and the inputs of a call
# together fill the last-level cache, the output cannot stay there anyway, and the map
# passes store it past the caches (x86 movntps/movntpd: 32-byte vectors, no read, weakly
# ordered, hence the fence at the end of each task). launch.py decides; measurements in
# docs/benchmarks.md.

VECTOR_BYTES = 32


def _lanes(context, builder, vector, kind, value, element):
    """A float operand (cast to ``element``, a Numba type) broadcast to every lane; an integer
    one is the address of a vector."""
    if isinstance(kind, types.Float):
        value = context.cast(builder, value, kind, element)
        lanes = ir.Constant(vector, ir.Undefined)
        for i in range(vector.count):
            lanes = builder.insert_element(lanes, value, ir.IntType(32)(i))
        return lanes
    return builder.load(builder.inttoptr(value, vector.as_pointer()), align=1)


def _vector_store(formula, like, array, out, operands, data):
    """The signature and codegen of an intrinsic (like, array, out, *operands) that computes
    ``formula`` on one 32-byte vector (8 float32 or 4 float64 lanes of the compute dtype,
    that of ``like``) and stores it past the caches at the integer address ``out``, in the
    type of the data ``array`` (``like``'s, or half-precision bits with float32: then a
    16-byte vector); the values of ``like`` and ``array`` are not used. Each operand is a
    float, rounded to the compute dtype and used in every lane, or the integer address of
    a vector: of data for the first ``data`` operands (widened as it is loaded), else of
    per-channel values in the compute dtype. ``out`` must be aligned to the stored
    vector's size."""
    if not (like in (types.float32, types.float64) and isinstance(out, types.Integer)):
        return None
    if not isinstance(array, types.Array):
        return None
    stored = array.dtype
    if not (stored == like or (like == types.float32 and stored in HALF_FORMATS)):
        return None
    if not all(isinstance(a, (types.Integer, types.Float)) for a in operands):
        return None

    def codegen(context, builder, signature, values):
        element = ir.FloatType() if like == types.float32 else ir.DoubleType()
        vector = ir.VectorType(element, VECTOR_BYTES // (4 if like == types.float32 else 8))
        half = stored in HALF_FORMATS
        storage = ir.VectorType(ir.IntType(16), vector.count) if half else vector
        lanes = []
        for i, (kind, value) in enumerate(zip(signature.args[3:], values[3:], strict=True)):
            if i < data and half:
                lanes.append(_widen(builder, _lanes(context, builder, storage, kind, value, like), stored))
            else:
                lanes.append(_lanes(context, builder, vector, kind, value, like))
        result = formula(builder, *lanes)
        if half:
            result = _narrow(builder, result, stored)
        size = storage.count * 2 if half else VECTOR_BYTES
        store = builder.store(result, builder.inttoptr(values[2], storage.as_pointer()), align=size)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.none(like, array, out, *operands), codegen


def _vector_span(like, data):
    """Bytes of the array ``data`` that one vector of _vector_store covers, computing in
    ``like``'s dtype: 32 for float32 or float64 data, 16 for half-precision data."""


@overload(_vector_span, jit_options=_serial)
def _vector_span_overload(like, data):
    span = VECTOR_BYTES * data.dtype.bitwidth // like.bitwidth
    return lambda like, data: span


_FUSED = ("contract",)  # as the loops' fastmath: a * b + c may become one fma


def _affine_formula(builder, x, mean, scale, offset):
    """(x - mean) * scale + offset"""
    return builder.fadd(builder.fmul(builder.fsub(x, mean), scale, flags=_FUSED), offset, flags=_FUSED)


def _two_term_formula(builder, dy, x, dy_scale, center, x_scale, const):
    """dy * dy_scale + ((x - center) * x_scale + const)"""
    x_term = _affine_formula(builder, x, center, x_scale, const)
    return builder.fadd(builder.fmul(dy, dy_scale, flags=_FUSED), x_term, flags=_FUSED)


@intrinsic
def _affine_nt(typingctx, like, array, y, x, mean, scale, offset):
    """y = (x - mean) * scale + offset on one vector, stored past the caches (_vector_store)."""
    return _vector_store(_affine_formula, like, array, y, (x, mean, scale, offset), data=1)


@intrinsic
def _two_term_nt(typingctx, like, array, dx, dy, x, dy_scale, center, x_scale, const):
    """dx = dy * dy_scale + ((x - center) * x_scale + const) on one vector, as _affine_nt."""
    return _vector_store(_two_term_formula, like, array, dx, (dy, x, dy_scale, center, x_scale, const), data=2)


@intrinsic
def _store_fence(typingctx):
    """sfence: the task's stores past the caches are done before anything after it."""

    def codegen(context, builder, signature, args):
        name = "llvm.x86.sse.sfence"
        function = builder.module.globals.get(name)
        if function is None:
            function = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []), name)
        builder.call(function, [])
        return context.get_dummy_value()

    return types.none(), codegen


@njit(**_serial)
def _affine_row_nt(x, y, a, c, mean, scale, offset):
    """y[a, c, :] = (x[a, c, :] - mean) * scale + offset on (A, C, B) arrays, stored past the
    caches; the row must be whole cache lines (launch.py checks). ``mean``, ``scale`` and
    ``offset`` are of the compute dtype."""
    B, size = x.shape[2], x.itemsize
    start = (a * x.shape[1] + c) * B * size
    for at in range(start, start + B * size, _vector_span(mean, x)):
        _affine_nt(mean, x, y.ctypes.data + at, x.ctypes.data + at, mean, scale, offset)


@njit(**_serial)
def _two_term_row_nt(dy, x, dx, a, c, dy_scale, center, x_scale, const):
    """dx[a, c, :] = dy[a, c, :] * dy_scale + (x[a, c, :] - center) * x_scale + const, as _affine_row_nt."""
    B, size = x.shape[2], x.itemsize
    start = (a * x.shape[1] + c) * B * size
    for at in range(start, start + B * size, _vector_span(dy_scale, x)):
        dy_at, x_at, dx_at = dy.ctypes.data + at, x.ctypes.data + at, dx.ctypes.data + at
        _two_term_nt(dy_scale, x, dx_at, dy_at, x_at, dy_scale, center, x_scale, const)


# ------------------------------------------------------------------ channel sums
#
# Each row of a channel is summed in the compute dtype (8 float32 lanes per vector
# instead of 4 float64, and no conversions) in spans of at most SPAN values, and each
# span's sum is carried in float64. Vectorized, a span's sum is the sum of 32 partial
# sums (4 vectors of 8 lanes, LLVM's unrolling) of at most SPAN / 32 terms each, so
# its relative rounding error is below (SPAN / 32 + 5) * 2^-24, about 2e-6; the float64
# carries add nothing to it. On 32x256x14x14 float32 the sums ran about 10% faster
# than with float64 terms (docs/benchmarks.md).
SPAN = 1024


def _through(act, law, g, value, center, residual):
    """(g', d) for a fused layer's backward: g' = g * act'(z) the gradient ``g`` of its output
    taken through the activation, and d = x - center. ``value`` is x, z = d * scale + offset
    + residual, ``law`` = (scale, offset, slope, alpha, inverse_scale) as values (the caller
    indexes per-channel arrays). With act + FROM_OUTPUT (in-place activated batch norm)
    ``value`` is the layer's output instead: z = act^-1(value), and d = (z - residual -
    offset) * inverse_scale, inverse_scale = 1 / (gamma * invstd) (x - mean recovered, the
    center being the mean). Identity: (g, x - center)."""


@overload(_through, jit_options=_serial, inline="always", prefer_literal=True)
def _through_overload(act, law, g, value, center, residual):
    # by the literal code, as activation.activate: the plain layer's kernels compile none of it
    if not isinstance(act, types.IntegerLiteral):
        return None
    code = act.literal_value
    if code == IDENTITY:
        return lambda act, law, g, value, center, residual: (g, value - center)
    if code >= FROM_OUTPUT:
        base = code - FROM_OUTPUT

        def from_output(act, law, g, value, center, residual):
            z = inverse(base, value, law[2], law[3])
            return g * derivative(base, z, law[2], law[3]), (_minus(z, residual) - law[1]) * law[4]

        return from_output

    def from_input(act, law, g, value, center, residual):
        d = value - center
        return g * derivative(act, _plus(d * law[0] + law[1], residual), law[2], law[3]), d

    return from_input


def _plus(z, residual):
    """z + residual; z when the residual is None."""


@overload(_plus, jit_options=_serial, inline="always")
def _plus_overload(z, residual):
    if isinstance(residual, types.NoneType):
        return lambda z, residual: z
    return lambda z, residual: z + residual


def _minus(z, residual):
    """z - residual; z when the residual is None."""


@overload(_minus, jit_options=_serial, inline="always")
def _minus_overload(z, residual):
    if isinstance(residual, types.NoneType):
        return lambda z, residual: z
    return lambda z, residual: z - residual


def _law(act, weight, invstd, bias, slope, alpha):
    """A fused layer's per-channel law (scale, offset, slope, alpha, inverse_scale) for
    _through, arrays indexed by _row_law; None for the plain layer, which allocates nothing."""


@overload(_law, jit_options=_serial, inline="always", prefer_literal=True)
def _law_overload(act, weight, invstd, bias, slope, alpha):
    if isinstance(act, types.IntegerLiteral) and act.literal_value == IDENTITY:
        return lambda act, weight, invstd, bias, slope, alpha: None
    return lambda act, weight, invstd, bias, slope, alpha: (
        weight * invstd,
        bias,
        slope,
        alpha,
        _inverse_scale(weight, invstd),
    )


@njit(**_serial)
def _inverse_scale(weight, invstd):
    """1 / (gamma * invstd) per channel, for the inversion of in-place activated batch norm:
    |gamma| below INVERT_FLOOR is taken as INVERT_FLOOR with gamma's sign (inplace_abn's
    |gamma| + eps), so that a vanishing gamma cannot divide by zero."""
    inverse_scale = np.empty_like(invstd)
    for c in range(invstd.shape[0]):
        gamma = weight[c]
        if abs(gamma) < INVERT_FLOOR:
            gamma = INVERT_FLOOR if gamma >= 0 else -INVERT_FLOOR
        inverse_scale[c] = 1.0 / (np.float64(gamma) * np.float64(invstd[c]))
    return inverse_scale


INVERT_FLOOR = 1e-5


def _row_law(law, c):
    """Channel ``c``'s law (scale, offset, slope, alpha) from one with per-channel arrays; None for None."""


@overload(_row_law, jit_options=_serial)
def _row_law_overload(law, c):
    if isinstance(law, types.NoneType):
        return lambda law, c: None
    return lambda law, c: (law[0][c], law[1][c], law[2], law[3], law[4][c])


@njit(inline="always", **_serial)
def _span_sums(x, other, a, c, start, stop, shift, act, law, residual):
    """Sums in the compute dtype over values start to stop of row (a, c) of (A, C, B)
    data: without ``other``, sum(x - shift) and sum((x - shift)^2); with it, sum(g)
    and sum(g * (x - shift)), g = other (the output's gradient) taken through the
    activation ``act`` of a fused layer (_through; ``law`` for row (a, c), ``residual``
    its (A, C, B) input or None). ``shift`` has the compute dtype."""
    f = shift - shift  # zero, of the compute dtype (a float64 0.0 would widen every term)
    s = shift - shift
    if other is None:
        for b in range(start, stop):
            d = _up(x[a, c, b]) - shift
            f += d
            s += d * d
    else:
        for b in range(start, stop):
            r = None if residual is None else _up(residual[a, c, b])
            g, d = _through(act, law, _up(other[a, c, b]), _up(x[a, c, b]), shift, r)
            f += g
            s += g * d
    return f, s


@njit(inline="always", **_serial)
def _span_sums_carried(x, other, a, c, start, stop, shift, act, law, residual):
    """_span_sums as float64. A span whose sums overflow the compute dtype (float32
    squares overflow from |x - shift| near 2e19, where the variance itself still fits)
    is summed again with float64 terms, so only data that is not finite gives sums
    that are not."""
    f, s = _span_sums(x, other, a, c, start, stop, shift, act, law, residual)
    # comparisons, not math.isfinite: inlined into _row_sums's loop of whole spans, the
    # isfinite checks were folded away (the redo never ran, an overflowed sum came back inf)
    if -math.inf < f < math.inf and -math.inf < s < math.inf:
        return np.float64(f), np.float64(s)
    return _span_sums(x, other, a, c, start, stop, np.float64(shift), act, law, residual)


@njit(inline="always", **_serial)
def _row_sums(x, other, a, c, shift, act, law, residual):
    """The sums of _span_sums over row (a, c), span by span, carried in float64.

    Whole spans of SPAN values, then the rest: with each span's end written as
    min(start + SPAN, B) LLVM did not vectorize the loop (8x slower sums on rows of
    3136 float32 values, AVX-512 machine, numba 0.68.1), and a row of at most SPAN
    values is one span from 0."""
    B = x.shape[2]
    if B <= SPAN:
        return _span_sums_carried(x, other, a, c, 0, B, shift, act, law, residual)
    total = 0.0
    total_second = 0.0
    whole = B // SPAN
    for k in range(whole):
        f, s = _span_sums_carried(x, other, a, c, k * SPAN, k * SPAN + SPAN, shift, act, law, residual)
        total += f
        total_second += s
    if whole * SPAN < B:
        f, s = _span_sums_carried(x, other, a, c, whole * SPAN, B, shift, act, law, residual)
        total += f
        total_second += s
    return total, total_second


# ---------------------------------------------------------------- forward, train


@njit(**_parallel)
def forward_train_channels(
    x, weight, bias, eps, y, mean_out, invstd_out, var_out, threads, nontemporal, act, slope, alpha, residual
):
    """Algorithm 1 on (A, C, B) data, one channel per task (prange splits the channels;
    ``threads``, which the other families split their work by, is not used).

    Each channel is reduced and then normalized while its values are still in
    cache: mu = mean(x), var = mean((x - mu)^2), y = (x - mu) * gamma/sqrt(var + eps) + beta;
    a fused layer's output is act(y + residual) (_activated_row).
    """
    literally(act)
    A, C, B = x.shape
    m = A * B
    scale = np.empty_like(mean_out)
    base, row_bytes = x.ctypes.data, _prefetch_bytes(x)
    for c in prange(C):
        for a in range(min(PREFETCH_ROWS, A)):
            _prefetch_row(base, a * C + c, row_bytes)
        shift = _up(x[0, c, 0])
        total = 0.0
        total_sq = 0.0
        for a in range(A):
            if a + PREFETCH_ROWS < A:
                _prefetch_row(base, (a + PREFETCH_ROWS) * C + c, row_bytes)
            f, s = _row_sums(x, None, a, c, shift, IDENTITY, None, None)
            total += f
            total_sq += s
        mean, var, invstd = _finish_stats(np.float64(shift), total, total_sq, m, eps)
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        scale[c] = weight[c] * invstd
        mu = mean_out[c]
        s = scale[c]
        beta = bias[c]
        if act != IDENTITY or residual is not None:
            for a in range(A):
                _activated_row(x, y, a, c, mu, s, beta, act, slope, alpha, residual)
        elif nontemporal:
            for a in range(A):
                _affine_row_nt(x, y, a, c, mu, s, beta)
            _store_fence()
        else:
            for a in range(A):
                for b in range(B):
                    y[a, c, b] = _down((_up(x[a, c, b]) - mu) * s + beta, y)


@njit(inline="always", **_serial)
def _activated_row(x, y, a, c, mean, scale, offset, act, slope, alpha, residual):
    """y[a, c, :] = act((x[a, c, :] - mean) * scale + offset + residual[a, c, :]) on (A, C, B)
    arrays, the map of a fused layer (kernels/activation.py; no residual when None). Stored
    through the caches: launch.py asks for stores past them only for the plain map."""
    for b in range(x.shape[2]):
        z = (_up(x[a, c, b]) - mean) * scale + offset
        if residual is not None:
            z += _up(residual[a, c, b])
        y[a, c, b] = _down(activate(act, z, slope, alpha), y)


# rows summed in the data's dtype before each float64 carry (see _channel_sums_rows);
# with 64 rows a block rather than 16, the sum pass on 32x256x14x14 channels_last took
# 0.85x to 0.94x the time (a quarter as many carries of C values); docs/benchmarks.md
ROW_BLOCK = 64


@njit(**_parallel)
def _channel_sums_rows(x, shift, other, threads, act, law, residual):
    """Per-chunk float64 sums over the rows of (A, C) data, vectorized over C.

    ``shift`` has the compute dtype.
    With ``other`` None: sum(x - shift) and sum((x - shift)^2).
    With ``other`` given: sum(g) and sum(g * (x - shift)), g = other taken through a fused
    layer's activation (_through; ``law`` with per-channel scale and offset arrays,
    ``residual`` (A, C) or None).
    Returns two (chunks, C) arrays; the caller adds the chunks.

    Blocks of ROW_BLOCK rows are summed in the compute dtype (8 float32 lanes per
    vector instead of 4 float64) and each block's sum is carried in float64: a
    block adds at most 64 terms, so its relative rounding error is below 64 * 2^-24,
    about 4e-6, and the float64 carries add nothing to it. Without ``other`` four
    rows are summed a step (64x64x32x32 channels_last: 0.35 against 0.52 ms); the
    gradient sums stay one row a step, which was faster for them (0.51 against 0.99).
    """
    literally(act)
    A, C = x.shape
    chunks = min(threads, A)
    first = np.zeros((chunks, C))
    second = np.zeros((chunks, C))
    for t in prange(chunks):
        lo = t * A // chunks
        hi = (t + 1) * A // chunks
        f = first[t]
        s = second[t]
        block_first = np.zeros(C, shift.dtype)
        block_second = np.zeros(C, shift.dtype)
        for start in range(lo, hi, ROW_BLOCK):
            stop = min(start + ROW_BLOCK, hi)
            a = start
            if other is None:
                # four rows a step: four loads in flight per channel vector, and a
                # quarter of the block's adds go through the loop-carried sums
                while a + 4 <= stop:
                    for c in range(C):
                        k = shift[c]
                        d0 = _up(x[a, c]) - k
                        d1 = _up(x[a + 1, c]) - k
                        d2 = _up(x[a + 2, c]) - k
                        d3 = _up(x[a + 3, c]) - k
                        block_first[c] += (d0 + d1) + (d2 + d3)
                        block_second[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                    a += 4
            for b in range(a, stop):
                for c in range(C):
                    if other is None:
                        d = _up(x[b, c]) - shift[c]
                        block_first[c] += d
                        block_second[c] += d * d
                    else:
                        r = None if residual is None else _up(residual[b, c])
                        g, d = _through(act, _row_law(law, c), _up(other[b, c]), _up(x[b, c]), shift[c], r)
                        block_first[c] += g
                        block_second[c] += g * d
            for c in range(C):
                f[c] += block_first[c]
                s[c] += block_second[c]
                block_first[c] = 0
                block_second[c] = 0
        # a block that overflowed the compute dtype (as in _span_sums_carried) left its
        # channel's sum not finite: the chunk's rows again with float64 terms, in row
        # order over every channel (one pass, as the NCHW kernels redo a span); checked
        # once a chunk, so that the carries above stay plain vector adds
        redo = False
        for c in range(C):
            redo |= not (math.isfinite(f[c]) and math.isfinite(s[c]))
        if redo:
            wide_first, wide_second = _rows_sums_float64(x, shift, other, lo, hi, act, law, residual)
            for c in range(C):
                if not (math.isfinite(f[c]) and math.isfinite(s[c])):
                    f[c], s[c] = wide_first[c], wide_second[c]
    return first, second


@njit(**_serial)
def _rows_sums_float64(x, shift, other, lo, hi, act, law, residual):
    """The sums of _channel_sums_rows over rows lo to hi of (A, C) data, float64 terms."""
    literally(act)
    C = x.shape[1]
    first = np.zeros(C)
    second = np.zeros(C)
    for a in range(lo, hi):
        for c in range(C):
            value, center = np.float64(_up(x[a, c])), np.float64(shift[c])
            if other is None:
                d = value - center
                first[c] += d
                second[c] += d * d
            else:
                r = None if residual is None else np.float64(_up(residual[a, c]))
                g, d = _through(act, _row_law(law, c), np.float64(_up(other[a, c])), value, center, r)
                first[c] += g
                second[c] += g * d
    return first, second


@njit(**_parallel)
def _centered_affine_rows(x, mean, scale, offset, y, threads, nontemporal, act, slope, alpha, residual):
    """y = (x - mean) * scale + offset per channel, on (A, C) data; y stored past the caches
    when ``nontemporal`` (rows of whole cache lines; per-channel values loaded as vectors).
    A fused layer's map: y = act(that + residual), stored through the caches."""
    literally(act)
    A, C = x.shape
    chunks = min(threads, A)
    step, size, channel_size = VECTOR_BYTES // mean.itemsize, x.itemsize, mean.itemsize
    for t in prange(chunks):
        for a in range(t * A // chunks, (t + 1) * A // chunks):
            if act != IDENTITY or residual is not None:
                for c in range(C):
                    z = (_up(x[a, c]) - mean[c]) * scale[c] + offset[c]
                    if residual is not None:
                        z += _up(residual[a, c])
                    y[a, c] = _down(activate(act, z, slope, alpha), y)
            elif nontemporal:
                for c in range(0, C, step):
                    at, k = (a * C + c) * size, c * channel_size
                    _affine_nt(
                        mean[0], x, y.ctypes.data + at, x.ctypes.data + at,
                        mean.ctypes.data + k, scale.ctypes.data + k, offset.ctypes.data + k,
                    )  # fmt: skip
            else:
                for c in range(C):
                    y[a, c] = _down((_up(x[a, c]) - mean[c]) * scale[c] + offset[c], y)
        if nontemporal and act == IDENTITY and residual is None:
            _store_fence()


@njit(**_serial)
def _finish_chunks(shift, first, second, m, eps, weight, mean_out, invstd_out, var_out):
    """The statistics from per-chunk sums (rows of ``first`` and ``second``) around ``shift``,
    written to the outputs; returns scale = gamma * invstd."""
    C = mean_out.shape[0]
    scale = np.empty_like(mean_out)
    for c in range(C):
        mean, var, invstd = _finish_stats(shift[c], first[:, c].sum(), second[:, c].sum(), m, eps)
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        scale[c] = weight[c] * invstd
    return scale


@njit(**_serial)
def forward_train_rows(
    x, weight, bias, eps, y, mean_out, invstd_out, var_out, threads, nontemporal, act, slope, alpha, residual
):
    """Algorithm 1 on (A, C) data (channels last): sums over row chunks, then the map (a
    fused layer's: act(y + residual))."""
    literally(act)
    A, C = x.shape
    shift = np.empty_like(mean_out)
    for c in range(C):
        shift[c] = _up(x[0, c])
    first, second = _channel_sums_rows(x, shift, None, threads, IDENTITY, None, None)
    scale = _finish_chunks(shift, first, second, A, eps, weight, mean_out, invstd_out, var_out)
    _centered_affine_rows(x, mean_out, scale, bias, y, threads, nontemporal, act, slope, alpha, residual)


# ------------------------------------------ forward, train, in memory order
#
# A channel-major pass over NCHW data reads each channel's A rows of B values, C * B
# values apart. With rows shorter than a page and a tensor that fits in the last-level
# cache, two passes in memory order, as the channels_last kernels make them (the sums,
# then the map, which finds x in cache), are faster: launch.py chooses. Measured on the
# development machine, kernels against kernels in shuffled rounds with a 96 MB copy
# between them, forward+backward: 32x256x14x14 1.23x to 1.27x, 32x512x7x7 1.26x to
# 1.36x, 64x32x28x28 1.13x to 1.19x, 16x256x14x14 1.11x; rows of 4 KiB (64x64x32x32)
# 0.92x to 0.98x, and 26 MB tensors with short rows (128x256x14x14, 64x128x28x28)
# 0.93x to 1.03x.


@njit(**_parallel)
def _channel_sums_stream(x, shift, other, threads, act, law, residual):
    """Per-chunk float64 sums over (A, C, B) data, its A * C rows split into ``threads``
    chunks in memory order; as _channel_sums_rows: without ``other``, sum(x - shift) and
    sum((x - shift)^2), with it sum(g) and sum(g * (x - shift)), g through the activation. Each row is
    summed in the compute dtype as one span (rows here are shorter than
    PREFETCH_ROW_BYTES: at most 2047 half values, a relative error below 69 * 2^-24)
    and carried in float64 into its channel's sum in the chunk."""
    literally(act)
    A, C, B = x.shape
    rows = A * C
    chunks = min(threads, rows)
    first = np.zeros((chunks, C))
    second = np.zeros((chunks, C))
    # (a, c) stepped row by row, here and in the map passes, not worked out as divmod(r, C):
    # the division took 14% of these sums on 32x256x14x14 float32 (hot, 118 against 102 us)
    for t in prange(chunks):
        start = t * rows // chunks
        a = start // C
        c = start - a * C
        for _ in range(start, (t + 1) * rows // chunks):  # rows (a, c) in memory order
            f, s = _span_sums_carried(x, other, a, c, 0, B, shift[c], act, _row_law(law, c), residual)
            first[t, c] += f
            second[t, c] += s
            c += 1
            if c == C:
                c = 0
                a += 1
    return first, second


@njit(**_serial)
def forward_train_stream(
    x, weight, bias, eps, y, mean_out, invstd_out, var_out, threads, nontemporal, act, slope, alpha, residual
):
    """Algorithm 1 on (A, C, B) data in two passes in memory order: the sums, then the map."""
    literally(act)
    A, C, B = x.shape
    shift = np.empty_like(mean_out)
    for c in range(C):
        shift[c] = _up(x[0, c, 0])
    first, second = _channel_sums_stream(x, shift, None, threads, IDENTITY, None, None)
    scale = _finish_chunks(shift, first, second, A * B, eps, weight, mean_out, invstd_out, var_out)
    _centered_affine_channels(x, mean_out, scale, bias, y, threads, nontemporal, act, slope, alpha, residual)


# ----------------------------------------------------------------- forward, eval


@njit(**_serial)
def _eval_scale(running_mean, running_var, weight, eps):
    """E[x] and scale = gamma/sqrt(Var[x] + eps) in the compute dtype, weight's.

    Inference is one affine map per channel; it is applied as (x - E[x]) * scale + beta
    rather than x * scale + (beta - E[x]*scale), which cancels when |E[x]| >> std.
    """
    C = running_mean.shape[0]
    mean = np.empty_like(weight)
    scale = np.empty_like(weight)
    for c in range(C):
        mean[c] = running_mean[c]
        scale[c] = weight[c] / math.sqrt(np.float64(running_var[c]) + eps)
    return mean, scale


@njit(**_parallel)
def _centered_affine_channels(x, mean, scale, offset, y, threads, nontemporal, act, slope, alpha, residual):
    """y = (x - mean) * scale + offset per channel, on (A, C, B) data, its A * C rows split
    into ``threads`` chunks in memory order; y stored past the caches when ``nontemporal``;
    a fused layer's map act(y + residual) through them (_activated_row)."""
    literally(act)
    A, C, B = x.shape
    rows = A * C
    chunks = min(threads, rows)
    for t in prange(chunks):
        start = t * rows // chunks
        a = start // C
        c = start - a * C
        for _ in range(start, (t + 1) * rows // chunks):  # rows (a, c) in memory order
            mu = mean[c]
            s = scale[c]
            o = offset[c]
            if act != IDENTITY or residual is not None:
                _activated_row(x, y, a, c, mu, s, o, act, slope, alpha, residual)
            elif nontemporal:
                _affine_row_nt(x, y, a, c, mu, s, o)
            else:
                for b in range(B):
                    y[a, c, b] = _down((_up(x[a, c, b]) - mu) * s + o, y)
            c += 1
            if c == C:
                c = 0
                a += 1
        if nontemporal and act == IDENTITY and residual is None:
            _store_fence()


@njit(**_serial)
def forward_eval_channels(
    x, running_mean, running_var, weight, bias, eps, y, threads, nontemporal, act, slope, alpha, residual
):
    literally(act)
    mean, scale = _eval_scale(running_mean, running_var, weight, eps)
    _centered_affine_channels(x, mean, scale, bias, y, threads, nontemporal, act, slope, alpha, residual)


@njit(**_serial)
def forward_eval_rows(
    x, running_mean, running_var, weight, bias, eps, y, threads, nontemporal, act, slope, alpha, residual
):
    literally(act)
    mean, scale = _eval_scale(running_mean, running_var, weight, eps)
    _centered_affine_rows(x, mean, scale, bias, y, threads, nontemporal, act, slope, alpha, residual)


# ---------------------------------------------------------------------- backward


@njit(**_parallel)
def backward_channels(
    dy, x, mean, invstd, weight, training, dx, dweight, dbias, threads, nontemporal, bias, act, slope, alpha,
    residual, dresidual,
):  # fmt: skip
    """Gradients on (A, C, B) data, one channel per task (``threads`` not used, as in
    forward_train_channels).

    sum_dy = sum dy, sum_dy_xhat = sum dy * xhat (these are dbeta and dgamma), then
    training:  dx = gamma*invstd/m * (m*dy - sum_dy - xhat*sum_dy_xhat)
    eval:      dx = gamma*invstd * dy      (the statistics are constants)
    dx is skipped when it has no rows. A fused layer, out = act(y + residual), first takes
    the output's gradient through the activation, dy = d_out * act'(y + residual) (_through,
    recomputed from x in both passes), which is also the residual's gradient (dresidual,
    written beside dx when given; dx then has rows).
    """
    literally(act)
    A, C, B = x.shape
    m = A * B
    x_base, dy_base, row_bytes = x.ctypes.data, dy.ctypes.data, _prefetch_bytes(x)
    laws = _law(act, weight, invstd, bias, slope, alpha)
    for c in prange(C):
        for a in range(min(PREFETCH_ROWS, A)):
            _prefetch_row(x_base, a * C + c, row_bytes)
            _prefetch_row(dy_base, a * C + c, row_bytes)
        mu = np.float64(mean[c])
        law = _row_law(laws, c)  # see _through
        total = 0.0
        total_x = 0.0
        for a in range(A):
            if a + PREFETCH_ROWS < A:
                _prefetch_row(x_base, (a + PREFETCH_ROWS) * C + c, row_bytes)
                _prefetch_row(dy_base, (a + PREFETCH_ROWS) * C + c, row_bytes)
            f, s = _row_sums(x, dy, a, c, mean[c], act, law, residual)
            total += f
            total_x += s
        inv = np.float64(invstd[c])
        sum_dy_xhat = total_x * inv
        dbias[c] = total
        dweight[c] = sum_dy_xhat
        if dx.shape[0] == 0:
            continue
        gain = np.float64(weight[c]) * inv
        # coefficients rounded once to the compute dtype, so the loops below vectorize in it
        coef = np.empty(4, invstd.dtype)
        coef[0] = gain
        coef[1] = -gain / m * inv * sum_dy_xhat
        coef[2] = -gain / m * total
        coef[3] = mu
        a_dy = coef[0]
        if act != IDENTITY:
            a_x = coef[1] if training else like(0.0, a_dy)
            const = coef[2] if training else like(0.0, a_dy)
            for a in range(A):
                _activated_dx_row(dy, x, dx, a, c, a_dy, coef[3], a_x, const, act, law, residual, dresidual)
        elif training:
            mu_x = coef[3]
            a_x = coef[1]
            const = coef[2]
            if nontemporal:
                for a in range(A):
                    _two_term_row_nt(dy, x, dx, a, c, a_dy, mu_x, a_x, const)
                _store_fence()
            else:
                for a in range(A):
                    for b in range(B):
                        dx[a, c, b] = _down(_up(dy[a, c, b]) * a_dy + ((_up(x[a, c, b]) - mu_x) * a_x + const), dx)
        else:
            for a in range(A):
                for b in range(B):
                    dx[a, c, b] = _down(_up(dy[a, c, b]) * a_dy, dx)


@njit(inline="always", **_serial)
def _activated_dx_row(dy, x, dx, a, c, dy_scale, center, x_scale, const, act, law, residual, dresidual):
    """dx[a, c, :] = g * dy_scale + (x - center) * x_scale + const with g = dy through a fused
    layer's activation (_through, ``law`` for channel c), on (A, C, B) arrays; g also to
    dresidual when given."""
    for b in range(x.shape[2]):
        r = None if residual is None else _up(residual[a, c, b])
        g, d = _through(act, law, _up(dy[a, c, b]), _up(x[a, c, b]), center, r)
        if dresidual is not None:
            dresidual[a, c, b] = _down(g, dresidual)
        dx[a, c, b] = _down(g * dy_scale + (d * x_scale + const), dx)


@njit(**_serial)
def _backward_coefficients(first, second, invstd, weight, training, m, dweight, dbias):
    """dbeta, dgamma and the per-channel coefficients of dx = dy * dy_scale + (x - mean) *
    x_scale + const (in the compute dtype, invstd's) from per-chunk sums(dy) and
    sum(dy * (x - mean))."""
    C = invstd.shape[0]
    dy_scale = np.empty_like(invstd)
    x_scale = np.empty_like(invstd)
    const = np.empty_like(invstd)
    for c in range(C):
        total = first[:, c].sum()
        inv = np.float64(invstd[c])
        sum_dy_xhat = second[:, c].sum() * inv
        dbias[c] = total
        dweight[c] = sum_dy_xhat
        gain = np.float64(weight[c]) * inv
        dy_scale[c] = gain
        if training:
            k = gain / m
            x_scale[c] = -k * inv * sum_dy_xhat
            const[c] = -k * total
        else:
            x_scale[c] = 0.0
            const[c] = 0.0
    return dy_scale, x_scale, const


@njit(**_serial)
def backward_rows(
    dy, x, mean, invstd, weight, training, dx, dweight, dbias, threads, nontemporal, bias, act, slope, alpha,
    residual, dresidual,
):  # fmt: skip
    """Gradients on (A, C) data (channels last); same formulas as backward_channels."""
    literally(act)
    A, C = x.shape
    law = _law(act, weight, invstd, bias, slope, alpha)
    first, second = _channel_sums_rows(x, mean, dy, threads, act, law, residual)
    dy_scale, x_scale, const = _backward_coefficients(first, second, invstd, weight, training, A, dweight, dbias)
    if dx.shape[0] == 0:
        return
    _two_term_rows(dy, x, mean, dy_scale, x_scale, const, dx, threads, nontemporal, act, law, residual, dresidual)


@njit(**_serial)
def backward_stream(
    dy, x, mean, invstd, weight, training, dx, dweight, dbias, threads, nontemporal, bias, act, slope, alpha,
    residual, dresidual,
):  # fmt: skip
    """Gradients on (A, C, B) data in two passes in memory order; formulas of backward_channels."""
    literally(act)
    A, C, B = x.shape
    law = _law(act, weight, invstd, bias, slope, alpha)
    first, second = _channel_sums_stream(x, mean, dy, threads, act, law, residual)
    dy_scale, x_scale, const = _backward_coefficients(first, second, invstd, weight, training, A * B, dweight, dbias)
    if dx.shape[0] == 0:
        return
    _two_term_channels(dy, x, mean, dy_scale, x_scale, const, dx, threads, nontemporal, act, law, residual, dresidual)


@njit(**_parallel)
def _two_term_channels(
    dy, x, center, dy_scale, x_scale, const, dx, threads, nontemporal, act, law, residual, dresidual
):
    """dx = dy * dy_scale + (x - center) * x_scale + const per channel on (A, C, B) data,
    rows in ``threads`` chunks as _centered_affine_channels, dx past the caches when ``nontemporal``;
    with a fused layer's activation, dy taken through it first (_activated_dx_row)."""
    literally(act)
    A, C, B = x.shape
    rows = A * C
    chunks = min(threads, rows)
    for t in prange(chunks):
        start = t * rows // chunks
        a = start // C
        c = start - a * C
        for _ in range(start, (t + 1) * rows // chunks):  # rows (a, c) in memory order
            p = dy_scale[c]
            k = center[c]
            q = x_scale[c]
            o = const[c]
            if act != IDENTITY:
                _activated_dx_row(dy, x, dx, a, c, p, k, q, o, act, _row_law(law, c), residual, dresidual)
            elif nontemporal:
                _two_term_row_nt(dy, x, dx, a, c, p, k, q, o)
            else:
                for b in range(B):
                    dx[a, c, b] = _down(_up(dy[a, c, b]) * p + ((_up(x[a, c, b]) - k) * q + o), dx)
            c += 1
            if c == C:
                c = 0
                a += 1
        if nontemporal and act == IDENTITY:
            _store_fence()


@njit(**_parallel)
def _two_term_rows(dy, x, center, dy_scale, x_scale, const, dx, threads, nontemporal, act, law, residual, dresidual):
    """dx = dy * dy_scale + (x - center) * x_scale + const per channel, rows in parallel; dx
    past the caches as in _centered_affine_rows; with a fused layer's activation, dy taken
    through it first, and written to dresidual when given."""
    literally(act)
    A, C = x.shape
    chunks = min(threads, A)
    step, size, channel_size = VECTOR_BYTES // center.itemsize, x.itemsize, center.itemsize
    for t in prange(chunks):
        for a in range(t * A // chunks, (t + 1) * A // chunks):
            if act != IDENTITY:
                for c in range(C):
                    r = None if residual is None else _up(residual[a, c])
                    g, d = _through(act, _row_law(law, c), _up(dy[a, c]), _up(x[a, c]), center[c], r)
                    if dresidual is not None:
                        dresidual[a, c] = _down(g, dresidual)
                    dx[a, c] = _down(g * dy_scale[c] + (d * x_scale[c] + const[c]), dx)
            elif nontemporal:
                for c in range(0, C, step):
                    at, k = (a * C + c) * size, c * channel_size
                    _two_term_nt(
                        center[0], x, dx.ctypes.data + at, dy.ctypes.data + at, x.ctypes.data + at,
                        dy_scale.ctypes.data + k, center.ctypes.data + k, x_scale.ctypes.data + k,
                        const.ctypes.data + k,
                    )  # fmt: skip
            else:
                for c in range(C):
                    dx[a, c] = _down(
                        _up(dy[a, c]) * dy_scale[c] + ((_up(x[a, c]) - center[c]) * x_scale[c] + const[c]), dx
                    )
        if nontemporal and act == IDENTITY:
            _store_fence()


# -------------------------------------------------------------- running statistics


@njit(**_serial)
def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, m, momentum, correction):
    """The running averages, or nothing if the batch statistics are not finite.

    running_mean = (1 - f) * running_mean + f * mu
    running_var  = (1 - f) * running_var  + f * var * m/(m - correction)
    (correction 1: the unbiased var, torch's; 0: the biased var, Keras' and Flax'),
    with f = momentum, or f = 1/num_batches_tracked (cumulative) when momentum < 0.
    num_batches_tracked (a 1-element array, or empty) counts the batches used.
    Returns False, changing nothing, when any mean or var is NaN or infinite.
    """
    C = mean.shape[0]
    for c in range(C):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c])):
            return False
    if num_batches_tracked.shape[0] > 0:
        num_batches_tracked[0] += 1
    if momentum < 0.0:
        factor = 1.0 / num_batches_tracked[0]
    else:
        factor = momentum
    bessel = m / (m - correction)
    for c in range(C):
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean[c]
        running_var[c] = (1.0 - factor) * running_var[c] + factor * (var[c] * bessel)
    return True


@njit(**_serial)
def update_running_stats_from_invstd(
    running_mean, running_var, num_batches_tracked, mean, invstd, eps, m, momentum, correction
):
    """update_running_stats with the biased var recovered as 1/invstd^2 - eps, in float64.

    For statistics that come as (mean, 1/sqrt(var + eps)), as torch's kernel returns them;
    the recovered var is off by about 1e-7 * (1 + eps/var) relative in float32.
    """
    C = mean.shape[0]
    var = np.empty(C)
    for c in range(C):
        inv = np.float64(invstd[c])
        # 0 when torch's float32 variance overflowed: an infinite var, refused below
        var[c] = max(1.0 / (inv * inv) - eps, 0.0) if inv != 0.0 else math.inf
    return update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, m, momentum, correction)


# ------------------------------------------------------- arrays given by address


@intrinsic
def _pointer(typingctx, address, example):
    """The integer ``address`` as a pointer to values of ``example``'s type."""
    if not isinstance(address, types.Integer) or not isinstance(example, types.Number):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(example)(address, example), codegen


@njit(**_serial)
def update_running_stats_at(
    running_mean,
    running_var,
    num_batches_tracked,
    mean,
    spread,
    spread_is_invstd,
    channels,
    eps,
    m,
    momentum,
    correction,
    zero,
):
    """update_running_stats on tensors given by their data addresses.

    ``spread`` is the biased var, or 1/sqrt(var + eps) when ``spread_is_invstd``
    (torch's kernel returns that; update_running_stats_from_invstd recovers the var).
    ``running_mean``, ``running_var``, ``mean`` and ``spread`` hold ``channels``
    contiguous values of ``zero``'s dtype; ``num_batches_tracked`` one int64, or is 0
    for none. Passing addresses skips five numpy conversions (about 1.4 us each on the
    development machine, as much as the update itself): the caller checks every
    dtype, size, device and contiguity, since nothing here can.
    """
    counter = carray(_pointer(num_batches_tracked, np.int64(0)), 1 if num_batches_tracked != 0 else 0)
    buffers_mean = carray(_pointer(running_mean, zero), channels)
    buffers_var = carray(_pointer(running_var, zero), channels)
    batch_mean = carray(_pointer(mean, zero), channels)
    batch_spread = carray(_pointer(spread, zero), channels)
    if spread_is_invstd:
        return update_running_stats_from_invstd(
            buffers_mean, buffers_var, counter, batch_mean, batch_spread, eps, m, momentum, correction
        )
    return update_running_stats(buffers_mean, buffers_var, counter, batch_mean, batch_spread, m, momentum, correction)


def update_at_signature(zero) -> tuple:
    """The argument types update_running_stats_at is compiled for, for statistics of
    ``zero``'s dtype (float32 or float64); ``zero`` itself is passed as the float 0.0.

    ops.py calls that compiled function directly (Dispatcher.compile), not the dispatcher,
    which works out the type of every argument on each call: with cold caches that cost
    more than the update itself (docs/benchmarks.md, runs 36 to 39).
    """
    return (types.int64,) * 5 + (
        types.boolean, types.int64, types.float64, types.int64, types.float64, types.int64, typeof(zero),
    )  # fmt: skip


# ------------------------------------------- arrays of the kernels by address
#
# kernels/addressed.py calls the kernels above with arrays made here from addresses.


@njit(**_serial)
def _at(address, shape, zero):
    """The memory at ``address`` as a C-order array of ``shape`` and ``zero``'s dtype."""
    return carray(_pointer(address, zero), shape)


@njit(**_serial)
def _update_after(running_mean, running_var, counter, mean, var, C, m, momentum, correction, zero):
    """The running update after a forward by address (update_running_stats_at), or True
    with nothing to do when ``running_mean`` is 0."""
    if running_mean == 0:
        return True
    return update_running_stats_at(
        running_mean, running_var, counter, mean, var, False, C, 0.0, m, momentum, correction, zero
    )
