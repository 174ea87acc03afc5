"""What an experiment finds: its claims with verdicts, its table and figures, and the small
helpers every experiment uses to summarize runs over seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .train import Run

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
