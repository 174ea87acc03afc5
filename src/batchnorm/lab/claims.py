"""What an experiment finds: its claims with verdicts, its table and figures, and the small
helpers every experiment uses to summarize runs over seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .train import Run
from .verdicts import above, below, every, paired, rule

__all__ = ["Claim", "Result"]


@dataclass
class Claim:
    claim: str  # as the seeds make it
    measured: str
    verdict: str
    rule: str
    interval: str = ""  # the interval the verdict was decided on, with its confidence


@dataclass
class Result:
    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    claims: list[Claim]
    figures: dict[str, bytes] = field(default_factory=dict)  # caption -> PNG
    metrics: dict[str, list[list[dict]]] = field(default_factory=dict)  # label -> per-seed records


# Lab.tune's grids: every condition whose claim compares accuracies trains at the learning rate
# (and, where the claim is about trainability, the optimizer) of the grid under which its first
# seed reaches the best validation accuracy
LEARNING_RATES = {"sgd": (0.01, 0.05, 0.25, 1.25)}
TRAINABILITY = {"sgd": LEARNING_RATES["sgd"], "adam": (0.001, 0.01)}


def _grid_text(grid: dict[str, tuple[float, ...]] = LEARNING_RATES) -> str:
    return "; ".join(f"{optimizer} at {', '.join(f'{lr:g}' for lr in rates)}" for optimizer, rates in grid.items())


def _tuned(grid: dict[str, tuple[float, ...]] = LEARNING_RATES) -> str:
    """How the networks of a claim were tuned, for its rule."""
    what = "optimizer and learning rate" if len(grid) > 1 else "learning rate"
    return f"each network at the {what} of {_grid_text(grid)} best on its first seed's validation accuracy"


def _setting(changes: dict) -> str:
    """A configuration's optimizer and learning rate, as text."""
    return f"{changes['optimizer']} {changes['lr']:g}"


def _settings(runs: list[Run]) -> str:
    return _setting(vars(runs[0].config))


def _mean(values) -> float:
    return statistics.fmean(values)


def _spread(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values, digits: int = 3) -> str:
    return f"{_mean(values):.{digits}f} ± {_spread(values):.{digits}f}"


def _best(runs: list[Run]) -> list[float]:
    return [run.best() for run in runs]


def _final(runs: list[Run], key: str = "test_accuracy") -> list[float]:
    return [run.final[key] for run in runs]


def _chosen(runs: list[Run], key: str = "test_accuracy") -> list[float]:
    """``key`` at each run's chosen evaluation (the best validation accuracy: Run.chosen)."""
    return [run.chosen[key] for run in runs]


def _watched(run: Run) -> str:
    """The accuracy that speed is measured on: validation where the run has it, else test."""
    return "val_accuracy" if "val_accuracy" in run.metrics[0] else "test_accuracy"


def _steps_to(run: Run, target: float) -> int | None:
    """The first evaluated step at which the validation accuracy (test without one) reaches ``target``."""
    key = _watched(run)
    for record in run.metrics:
        if record[key] >= target:
            return record["step"]
    return None


def _steps_text(steps: list[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    if not reached:
        return "never"
    text = f"{_mean(reached):.0f}"
    return text if len(reached) == len(steps) else f"{text} ({len(reached)} of {len(steps)} seeds)"


def _metrics(named: dict[str, list[Run]]) -> dict[str, list[list[dict]]]:
    return {label: [run.metrics for run in runs] for label, runs in named.items()}


def _chance(lab) -> float:
    return 1.0 / lab.dataset.num_classes


def _log_steps(runs: list[Run], target: float) -> list[float]:
    """log of each run's steps to ``target``; a run that never reaches it counts as reaching it one
    evaluation after its last step (a lower bound on its true steps)."""
    out = []
    for run in runs:
        steps = _steps_to(run, target)
        out.append(math.log(steps if steps is not None else run.config.steps + run.config.eval_every))
    return out


def _movement(values: list[float], spread: float) -> float:
    """The root-mean-square deviation of ``values`` about their mean, in units of ``spread``: how far
    a quantity recorded at every evaluation moves over training, the same for any number of them."""
    centre = _mean(values)
    return math.sqrt(_mean([(v - centre) ** 2 for v in values])) / max(spread, 1e-12)


def _ratio(iv) -> str:
    """An interval of log(a / b) shown as the ratio a / b."""
    return f"x{math.exp(iv.mean):.2f} [{math.exp(iv.low):.2f}, {math.exp(iv.high):.2f}]"


def trains_faster(claim: str, with_bn: list[Run], without: list[Run]) -> tuple[Claim, float, tuple[list, list]]:
    """The claim of Figure 1a on paired runs with and without batch norm (each tuned): fewer steps
    to the lowest best validation accuracy of the runs without it, and a higher test accuracy.
    (The claim, that target accuracy, the steps of each run to it.)"""
    target = min(_chosen(without, _watched(without[0])))  # every seed without batch norm reaches it
    steps = tuple([_steps_to(run, target) for run in runs] for runs in (with_bn, without))
    fewer = paired(_log_steps(with_bn, target), _log_steps(without, target))
    higher = paired(_chosen(with_bn), _chosen(without))
    found = Claim(
        claim,
        f"steps to the lowest best validation accuracy of the network without batch norm over seeds "
        f"({target:.3f}): {_steps_text(steps[0])} with, {_steps_text(steps[1])} without; "
        f"test accuracy {_pm(_chosen(with_bn))} with, {_pm(_chosen(without))} without",
        every(below(fewer, math.log(0.5)), above(higher, 0.0)),
        "holds if the ratio of steps to that accuracy with / without lies below 1/2 and the test accuracy "
        f"with minus without lies above 0 ({rule(len(with_bn))}, paired; {_tuned()}; steps on the log scale, a run "
        "that never gets there counted one evaluation past its end); does not hold if either lies at or beyond "
        "its bound",
        f"steps ratio {_ratio(fewer)}; test accuracy with - without {higher.text(signed=True)}",
    )
    return found, target, steps
