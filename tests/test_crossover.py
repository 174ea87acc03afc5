"""crossover.py: the threshold from timings, the measurement on a fake clock, one measurement
per kind of call, the override, and a real measurement on this machine."""

import pytest
import torch

import batchnorm
from batchnorm import crossover, route

TOP = crossover.TOP


def _times(ours_wins_from: int | None):
    """Timings where the kernels are faster from ``ours_wins_from`` values on (never if None)."""
    return {
        size: ((1.0, 2.0) if ours_wins_from is not None and size >= ours_wins_from else (2.0, 1.0))
        for size in crossover.SIZES
    }


@pytest.mark.parametrize("wins_from", [1 << 12, 1 << 15, 1 << 18])
def test_threshold_is_where_the_kernels_start_to_win(wins_from):
    assert crossover.crossover(_times(wins_from)) == wins_from


def test_threshold_when_the_kernels_never_win_is_past_the_top():
    assert crossover.crossover(_times(None)) == TOP + 1


def test_a_win_below_a_loss_does_not_count():
    """The kernels must win at every larger size measured: a win at 2^13 under a loss at 2^16
    is noise or a cache effect, and the threshold stays above the loss."""
    times = _times(1 << 17)
    times[1 << 13] = (1.0, 2.0)
    assert crossover.crossover(times) == 1 << 17


def test_measure_times_each_side_at_each_size_and_keeps_the_fastest():
    """A fake clock: the kernels cost 10 + n/1000 units, torch's n/100, the first call of each
    (warm-up) 1000 more; each size's fastest is the model's cost, warm-up excluded."""
    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def side(per_value, fixed):
        def prepare(size):
            first = [True]

            def call():
                calls.append(size)
                now[0] += fixed + size * per_value + (1000.0 if first[0] else 0.0)
                first[0] = False

            return call

        return prepare

    times = crossover.measure(side(1 / 1000, 10.0), side(1 / 100, 0.0), sizes=(1000, 2000, 4000), repeat=3, clock=clock)
    assert times == {
        1000: pytest.approx((11.0, 10.0)),
        2000: pytest.approx((12.0, 20.0)),
        4000: pytest.approx((14.0, 40.0)),
    }
    assert len(calls) == 3 * 2 * (1 + 3)
    assert crossover.crossover(times) == 2000


def test_each_key_is_measured_once_and_the_override_wins(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", None)
    monkeypatch.setattr(crossover, "_measured", {})
    asked = []

    def sides(key):
        asked.append(key)
        win = (lambda size: lambda: None), (lambda size: lambda: sum(range(10_000)))
        return win

    assert crossover.threshold(("eval", "rows"), sides) == crossover.SIZES[0]
    assert crossover.threshold(("eval", "rows"), sides) == crossover.SIZES[0]
    assert asked == [("eval", "rows")]
    assert crossover.measured() == {("eval", "rows"): crossover.SIZES[0]}
    monkeypatch.setattr(crossover, "OVERRIDE", 77)
    assert crossover.threshold(("train", "maps"), sides) == 77
    monkeypatch.setattr(crossover, "OVERRIDE", {("train", "maps"): 5})
    assert crossover.threshold(("train", "maps", torch.float32, 2), sides) == 5
    assert asked == [("eval", "rows")]
    assert crossover.threshold(("train", "rows", torch.float32, 2), sides) == crossover.SIZES[0]  # not named
    assert asked == [("eval", "rows"), ("train", "rows", torch.float32, 2)]


@pytest.mark.parametrize("mode", ["eval", "train", "train, recorded"])
@pytest.mark.parametrize("family", ["rows", "maps", "folded"])
def test_real_measurement_on_this_machine(mode, family, monkeypatch):
    """route._sides times what the route runs: both sides give torch's results on the
    calibration inputs, and the threshold is one of the sizes measured or past the top."""
    monkeypatch.setattr(crossover, "OVERRIDE", None)
    monkeypatch.setattr(crossover, "_measured", {})
    key = (mode, family, torch.float32, torch.get_num_threads())
    threshold = crossover.threshold(key, route._sides)
    assert threshold in (*crossover.SIZES, TOP + 1)
    assert crossover.measured() == {key: threshold}


def test_a_calibrated_route_gives_torchs_numbers(monkeypatch):
    """With thresholds measured here, whatever they are, a small training step and eval match
    torch's layer."""
    monkeypatch.setattr(crossover, "OVERRIDE", None)
    monkeypatch.setattr(crossover, "_measured", {})
    ours, theirs = batchnorm.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    for shape in [(8, 16, 8, 8), (64, 16, 2, 2), (512, 16, 4, 4)]:
        x = torch.randn(shape) * 2 + 1
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(a), theirs(b)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=2e-5)
        ya.backward(torch.ones_like(ya))
        yb.backward(torch.ones_like(yb))
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=2e-5)
    expected = {("train, recorded", "maps"), ("train, recorded", "folded"), ("eval", "folded")}
    assert {key[:2] for key in crossover.measured()} == expected
