"""The activations of the fused kernels, one code each, and their derivatives.

    identity    z
    relu        max(z, 0)                              d/dz: 1 if z > 0 else 0
    leaky_relu  z if z > 0 else slope * z                    1 if z > 0 else slope
    elu         z if z > 0 else alpha * (exp(z) - 1)         1 if z > 0 else alpha * exp(z)
    silu        z * s, s = 1 / (1 + exp(-z))                 s * (1 + z * (1 - s))
    gelu        z * P(z), P the normal CDF                   P(z) + z * exp(-z^2 / 2) / sqrt(2 pi)
    gelu_tanh   z/2 * (1 + tanh(u)), u = k (z + 0.044715 z^3), k = sqrt(2/pi)
                d/dz: (1 + t)/2 + z/2 * (1 - t^2) * k * (1 + 3 * 0.044715 z^2), t = tanh(u)

The kernels take the code as a compile-time constant (Numba's ``literally``): each
activation compiles its own specialization of the one kernel, with no branch left in the
loops. ``z`` has the compute dtype (float32 for half-precision data), and so do ``slope``
and ``alpha``, so that nothing widens. A NaN stays a NaN; relu and leaky_relu send -inf
to 0 and -inf as torch does.
"""

from __future__ import annotations

import math

from numba import errors, types
from numba.extending import overload

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu", "gelu_tanh")
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, GELU, GELU_TANH = range(len(ACTIVATIONS))
CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
# added to a code for the backward of in-place activated batch norm (Rota Bulo et al. 2018):
# the kernels' data is then the layer's output, from which z = act^-1(output) is recovered
FROM_OUTPUT = 16
INVERTIBLE = ("identity", "leaky_relu", "elu")  # with negative_slope > 0 and alpha > 0

_inline = dict(inline="always", fastmath={"reassoc", "contract", "nsz", "arcp"}, cache=True, nogil=True)
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_K = 0.7978845608028654  # sqrt(2 / pi)
_CUBIC = 0.044715


def like(value, z):
    """The constant ``value`` in the float type of ``z`` (a Python float is a float64 in
    Numba, and float32 * float64 computes in float64)."""


@overload(like, jit_options=dict(cache=True, nogil=True))
def _like_overload(value, z):
    kind = z

    def cast(value, z):
        return kind(value)

    return cast


# activate, derivative and inverse are overloads chosen by the literal code: a kernel's
# specialization for one activation types and compiles that activation's formula only, and
# the plain layer's (identity) none of the others (with one function branching on the code,
# every kernel compiled every formula, and a fresh checkout's tests took 15 minutes, not 3)


def _code(act) -> int:
    if not isinstance(act, types.IntegerLiteral):
        raise errors.TypingError("the activation code must be a compile-time constant (numba.literally)")
    return act.literal_value


_overload = dict(
    jit_options=dict(cache=True, nogil=True, fastmath=_inline["fastmath"]), inline="always", prefer_literal=True
)


def activate(act, z, slope, alpha):
    """The activation ``act`` (a code of ACTIVATIONS, a compile-time constant) at z."""


@overload(activate, **_overload)
def _activate(act, z, slope, alpha):
    code = _code(act)
    if code == RELU:
        return lambda act, z, slope, alpha: z if not z <= 0 else like(0.0, z)  # -0.0, -inf give 0; NaN stays
    if code == LEAKY_RELU:
        return lambda act, z, slope, alpha: z if not z <= 0 else z * slope
    if code == ELU:
        return lambda act, z, slope, alpha: z if not z <= 0 else alpha * (math.exp(z) - like(1.0, z))
    if code == SILU:
        return lambda act, z, slope, alpha: z / (like(1.0, z) + math.exp(-z))
    if code == GELU:
        return lambda act, z, slope, alpha: z * (like(0.5, z) + like(0.5, z) * math.erf(z * like(_SQRT_HALF, z)))
    if code == GELU_TANH:

        def gelu_tanh(act, z, slope, alpha):
            u = like(_K, z) * (z + like(_CUBIC, z) * z * z * z)
            return like(0.5, z) * z * (like(1.0, z) + math.tanh(u))

        return gelu_tanh
    return lambda act, z, slope, alpha: z


def derivative(act, z, slope, alpha):
    """d activate(act, z) / dz; at z == 0 the derivative from the left, and at a NaN the
    branch torch takes there."""


@overload(derivative, **_overload)
def _derivative(act, z, slope, alpha):
    code = _code(act)
    if code == RELU:
        return lambda act, z, slope, alpha: like(1.0, z) if not z <= 0 else like(0.0, z)
    if code == LEAKY_RELU:
        return lambda act, z, slope, alpha: like(1.0, z) if z > 0 else slope
    if code == ELU:
        return lambda act, z, slope, alpha: like(1.0, z) if not z <= 0 else alpha * math.exp(z)
    if code == SILU:

        def silu(act, z, slope, alpha):
            one = like(1.0, z)
            s = one / (one + math.exp(-z))
            return s * (one + z * (one - s))

        return silu
    if code == GELU:

        def gelu(act, z, slope, alpha):
            half = like(0.5, z)
            cdf = half + half * math.erf(z * like(_SQRT_HALF, z))
            return cdf + z * math.exp(-half * z * z) * like(_INV_SQRT_2PI, z)

        return gelu
    if code == GELU_TANH:

        def gelu_tanh(act, z, slope, alpha):
            one, half, k, cubic = like(1.0, z), like(0.5, z), like(_K, z), like(_CUBIC, z)
            t = math.tanh(k * (z + cubic * z * z * z))
            return half * (one + t) + half * z * (one - t * t) * k * (one + like(3.0, z) * cubic * z * z)

        return gelu_tanh
    return lambda act, z, slope, alpha: like(1.0, z)


def inverse(act, out, slope, alpha):
    """z with activate(act, z) == out, for the INVERTIBLE activations (slope, alpha > 0)."""


@overload(inverse, **_overload)
def _inverse(act, out, slope, alpha):
    code = _code(act)
    if code == LEAKY_RELU:
        return lambda act, out, slope, alpha: out if out > 0 else out / slope
    if code == ELU:
        return lambda act, out, slope, alpha: out if out > 0 else math.log1p(out / alpha)
    return lambda act, out, slope, alpha: out
