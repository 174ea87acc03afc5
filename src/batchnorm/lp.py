"""lp batch norm (Santurkar, Tsipras, Ilyas & Madry 2018, section 3.3): ``LpBatchNorm1d/2d/3d``
and ``LpBatchNorm``.

Batch norm that divides by another measure of the batch's spread. Training, per channel, over
the m values of the batch, with mu the batch mean::

    norm="l1"    s = mean(|x - mu|)                the mean absolute deviation
    norm="l2"    s = sqrt(mean((x - mu)^2))        the standard deviation: BatchNorm itself
    norm="linf"  s = max(|x - mu|)                 the largest deviation
    y = weight * (x - mu) / sqrt(s^2 + eps) + bias
    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * s^2      (l1, linf; l2: BatchNorm's)

Evaluation is BatchNorm's, with running_var the running s^2: the buffers and the state_dict
are BatchNorm's. The statistics are the shared ones (kernels/reference.py, ``moments`` with
its ``p``), computed in torch ops for l1 and linf (torch_stats.py) and by the kernels for
l2; gradients flow through mu and s (|x - mu| and the max by their subgradients).
"""

from __future__ import annotations

from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .torch_stats import NORMS

__all__ = ["LpBatchNorm", "LpBatchNorm1d", "LpBatchNorm2d", "LpBatchNorm3d"]


def _lp_init(base):
    def __init__(
        self,
        num_features: int,
        norm: str = "l1",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        **axis,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got norm={norm!r}")
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, **axis)
        self.norm = norm
        if NORMS[norm] != 2:
            self.p = NORMS[norm]

    return __init__


class _Lp:
    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm!r}"


_DOC = """lp batch norm over {what} (see batchnorm.lp for the formulas).

Args: num_features; norm ("l1", "l2" or "linf": the spread that divides); then eps, momentum,
affine, track_running_stats, device, dtype{extra} as {base}'s, whose buffers and state_dict
these are.
"""


class LpBatchNorm1d(_Lp, BatchNorm1d):
    __doc__ = _DOC.format(what="(N, C) or (N, C, L) input", extra="", base="BatchNorm1d")
    __init__ = _lp_init(BatchNorm1d)


class LpBatchNorm2d(_Lp, BatchNorm2d):
    __doc__ = _DOC.format(what="(N, C, H, W) input", extra="", base="BatchNorm2d")
    __init__ = _lp_init(BatchNorm2d)


class LpBatchNorm3d(_Lp, BatchNorm3d):
    __doc__ = _DOC.format(what="(N, C, D, H, W) input", extra="", base="BatchNorm3d")
    __init__ = _lp_init(BatchNorm3d)


class LpBatchNorm(_Lp, BatchNorm):
    __doc__ = _DOC.format(
        what="input of rank 2 or more with its channels on ``axis``", extra="; axis (keyword-only, 1)", base="BatchNorm"
    )
    __init__ = _lp_init(BatchNorm)
