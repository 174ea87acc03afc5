"""Verdicts by stated statistical rules: Student-t confidence intervals over seeds.

Every claim of the lab is decided on an interval, not on a mean: the mean of n values
(one per seed, or one paired difference per seed) with its two-sided ``CONFIDENCE``
interval

    mean ± t_{(1 + CONFIDENCE) / 2, n - 1} · s / sqrt(n),   s the sample standard deviation.

Three rules turn an interval into ``holds``, ``does not hold`` or ``inconclusive``:

- ``above(iv, bound)``: the quantity exceeds ``bound`` ("A beats B" is ``above(paired(a, b), 0)``):
  holds if the whole interval is above the bound, does not hold if the whole interval is at
  or below it, inconclusive if the interval straddles it;
- ``below(iv, bound)``: the mirror image;
- ``within(iv, margin)``: "little difference": holds if the interval lies inside
  (-margin, margin), does not hold if it lies entirely outside it (beyond either end),
  inconclusive otherwise.

``every`` joins several verdicts of one claim: holds if all hold, does not hold if any does
not, inconclusive otherwise. One value (n = 1) gives an infinite interval: inconclusive.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

__all__ = [
    "CONFIDENCE", "FAILS", "HOLDS", "UNSURE", "Interval", "above", "below", "every", "interval", "paired", "ratio",
    "rule", "within",
]  # fmt: skip

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 3, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def _finite(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name} must hold at least one value, got none")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must be finite numbers, got {bad[0]!r} among {values}")
    return values


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its Student-t ``confidence`` interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got confidence={confidence!r}")
    values = _finite(values, "values")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    half = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of the mean paired difference a - b (seed i of a against seed i of b)."""
    a, b = _finite(a, "a"), _finite(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired values need one b per a, got {len(a)} a and {len(b)} b")
    return interval([x - y for x, y in zip(a, b, strict=True)], confidence)


def ratio(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of the mean log(a / b) over paired seeds: for positive quantities that differ
    by orders of magnitude (steps, movements, landscape measures)."""
    a, b = _finite(a, "a"), _finite(b, "b")
    bad = [v for v in a + b if v <= 0]
    if bad:
        raise ValueError(f"ratio needs positive values, got {bad[0]!r}")
    return paired([math.log(v) for v in a], [math.log(v) for v in b], confidence)


def above(iv: Interval, bound: float) -> str:
    return HOLDS if iv.low > bound else FAILS if iv.high <= bound else UNSURE


def below(iv: Interval, bound: float) -> str:
    return HOLDS if iv.high < bound else FAILS if iv.low >= bound else UNSURE


def within(iv: Interval, margin: float) -> str:
    if margin <= 0:
        raise ValueError(f"margin must be positive, got margin={margin!r}")
    if -margin < iv.low and iv.high < margin:
        return HOLDS
    return FAILS if iv.low >= margin or iv.high <= -margin else UNSURE


def every(*verdicts: str) -> str:
    return FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNSURE


def rule(seeds: int) -> str:
    """How the intervals of a claim's rule are made, for its text."""
    return f"{CONFIDENCE:.0%} Student-t interval over {seeds} seeds"
