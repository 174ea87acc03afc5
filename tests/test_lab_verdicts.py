"""The lab's statistical rules: Student-t intervals against textbook values and simulated
coverage; each rule gives holds, does not hold and inconclusive on constructed inputs."""

import math
import random

import pytest

from batchnorm.lab import verdicts
from batchnorm.lab.verdicts import FAILS, HOLDS, UNSURE, Interval, above, below, every, interval, paired, within

# two-sided 95% Student-t quantiles t_{0.975, df} from the printed tables
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [0.41, 0.43, 0.40, 0.47, 0.44], [0.0, 1.0], [5.0] * 3 + [6.0] * 7])
def test_interval_is_the_t_interval_of_the_tables(values):
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * s / math.sqrt(n)
    iv = interval(values)
    assert iv.n == n and iv.mean == pytest.approx(mean)
    assert iv.low == pytest.approx(mean - half, abs=1e-3 * s + 1e-12)
    assert iv.high == pytest.approx(mean + half, abs=1e-3 * s + 1e-12)


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        iv = interval([rng.gauss(0.3, 2.0) for _ in range(5)])
        covered += iv.low < 0.3 < iv.high
    assert 0.93 < covered / trials < 0.97


def test_one_value_is_inconclusive_and_equal_values_are_exact():
    one = interval([0.7])
    assert one.low == -math.inf and one.high == math.inf
    assert above(one, 0.0) == below(one, 0.0) == within(one, 1.0) == UNSURE
    same = interval([0.2, 0.2, 0.2])
    assert same.low == pytest.approx(0.2) and same.high == pytest.approx(0.2)


def test_paired_takes_differences_seed_by_seed():
    a, b = [0.50, 0.61, 0.40], [0.45, 0.55, 0.36]
    iv, expected = paired(a, b), interval([0.05, 0.06, 0.04])
    assert (iv.mean, iv.low, iv.high) == pytest.approx((expected.mean, expected.low, expected.high))
    # unpaired, the seeds' spread (0.1) would swamp a difference that every seed shows
    assert above(paired(a, b), 0.0) == HOLDS
    assert above(interval([x - y for x, y in zip(a, sorted(b, reverse=True), strict=True)]), 0.0) == UNSURE


@pytest.mark.parametrize(
    ("iv", "expected"),
    [(Interval(0.05, 0.01, 0.09, 5), HOLDS), (Interval(-0.05, -0.09, -0.01, 5), FAILS),
     (Interval(0.0, -0.1, 0.0, 5), FAILS), (Interval(0.01, -0.02, 0.04, 5), UNSURE)],
)  # fmt: skip
def test_above_and_below(iv, expected):
    assert above(iv, 0.0) == expected
    mirrored = Interval(-iv.mean, -iv.high, -iv.low, iv.n)
    assert below(mirrored, 0.0) == expected


@pytest.mark.parametrize(
    ("iv", "expected"),
    [(Interval(0.0, -0.01, 0.015, 5), HOLDS), (Interval(0.05, 0.03, 0.07, 5), FAILS),
     (Interval(-0.05, -0.07, -0.02, 5), FAILS), (Interval(0.01, -0.01, 0.03, 5), UNSURE)],
)  # fmt: skip
def test_within_a_margin(iv, expected):
    assert within(iv, 0.02) == expected


def test_every_joins_verdicts():
    assert every(HOLDS, HOLDS) == HOLDS
    assert every(HOLDS, UNSURE) == UNSURE
    assert every(UNSURE, FAILS, HOLDS) == FAILS


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda: interval([]), "values must hold at least one value"),
     (lambda: interval([0.1, float("nan")]), "values must be finite numbers, got nan"),
     (lambda: interval([0.1, 0.2], confidence=1.0), "confidence must be in \\(0, 1\\), got confidence=1.0"),
     (lambda: paired([0.1, 0.2], [0.1]), "paired values need one b per a, got 2 a and 1 b"),
     (lambda: within(Interval(0, 0, 0, 2), 0.0), "margin must be positive, got margin=0.0")],
)  # fmt: skip
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rule_text_names_the_interval():
    assert verdicts.rule(5) == "95% Student-t interval over 5 seeds"


def test_ratio_is_the_paired_interval_of_the_logs():
    a, b = [2.0, 4.0, 9.0], [1.0, 1.0, 3.0]
    iv, logs = verdicts.ratio(a, b), interval([math.log(2.0), math.log(4.0), math.log(3.0)])
    assert (iv.mean, iv.low, iv.high) == pytest.approx((logs.mean, logs.low, logs.high))
    with pytest.raises(ValueError, match="ratio needs positive values, got 0.0"):
        verdicts.ratio([1.0, 0.0], [1.0, 1.0])
