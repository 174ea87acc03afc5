"""The experiments: each trains networks over several seeds and judges a claim.

Every claim gets a verdict from a rule written here (``holds``, ``does not hold``,
``inconclusive``) on intervals over the seeds (verdicts.py), shown in the report with the
numbers it was decided on. All runs share one base configuration, the paper's MLP (3 hidden
layers of 100 sigmoid units, batch 60, SGD with momentum 0.9), with VALIDATION of the training
set held out: each run reports its test accuracy at the evaluation of its best validation
accuracy (Run.chosen), and speed is measured on the validation accuracy, so that nothing is
chosen on the test set. Where a claim compares accuracies, each network trains at the learning
rate of claims.LEARNING_RATES (and, for trainability, the optimizer of claims.TRAINABILITY)
best on its first seed's validation accuracy (Lab.tune); where it compares at one learning
rate on purpose (the landscape's measures, batch size), at BASE_LR.
Identical configurations are trained once and shared between experiments.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from torch import nn

from .. import layers
from ..stats import population_statistics
from . import data as data_module
from . import images, optimization, plots
from .checkpoints import CheckpointError, save_atomically
from .checkpoints import load as load_kept
from .claims import (
    LEARNING_RATES,
    TRAINABILITY,
    Claim,
    Result,
    _chance,
    _chosen,
    _grid_text,
    _log_steps,
    _mean,
    _metrics,
    _movement,
    _pm,
    _ratio,
    _setting,
    _settings,
    _steps_text,
    _steps_to,
    _tuned,
    _watched,
    trains_faster,
)
from .train import Config, Run, build_model, evaluate, train
from .verdicts import HOLDS, UNSURE, above, below, every, interval, paired, ratio, rule, within

__all__ = ["EXPERIMENTS", "SCALES", "Claim", "Lab", "Result", "Scale"]

BASE_LR = 0.05  # where a claim compares at one learning rate (the landscape's measures, batch size)
VALIDATION = 0.1  # of the training set, held out: each run reports its test accuracy where this is best
MARGIN = optimization.MARGIN  # test accuracy: "as well" means at most this much worse


@dataclass(frozen=True)
class Scale:
    name: str
    steps: int
    eval_every: int
    seeds: int
    examples: int  # seen by each run of the normalizations experiment, at every batch size (Wu & He)
    image_steps: int  # of the images experiment's CNN
    image_eval_every: int
    batch_sizes: tuple[int, ...] = (2, 8, 64)  # of batch-size, at the scale's steps
    normalization_sizes: tuple[int, ...] = (2, 8, 64, 256)  # of normalizations, at the scale's examples
    sigmoid_depth: int = 6


SCALES = {
    "tiny": Scale(
        "tiny",
        steps=40,
        eval_every=20,
        seeds=2,
        examples=480,
        image_steps=40,
        image_eval_every=20,
        normalization_sizes=(2, 8, 64),
    ),
    "quick": Scale("quick", steps=1000, eval_every=100, seeds=5, examples=6_000, image_steps=500, image_eval_every=25),
    # the paper's Figure 1: 50,000 steps of batch 60
    "full": Scale(
        "full", steps=50_000, eval_every=1000, seeds=6, examples=240_000, image_steps=5000, image_eval_every=100
    ),
}


class Lab:
    """Trains configurations over seeds, each (configuration, seed) once.

    Every run trains with one torch thread, so that its numbers do not depend on how
    many runs share the machine; ``jobs`` forked worker processes train runs side by side.
    The numbers are the same for any ``jobs`` as long as batch norm takes the same path in
    workers and in-process: true for the lab's MLP, whose batch-norm inputs are small
    enough for torch's kernel (route.py) on this machine; larger inputs take the plain-torch path
    in forked workers (GNU OpenMP is not fork-safe) and may differ in the last bits.
    """

    def __init__(
        self,
        scale: Scale,
        dataset: data_module.Dataset,
        data: str = "mnist1d",
        seed: int = 0,
        log: Callable[[str], None] | None = None,
        jobs: int = 1,
        store: str | None = None,
    ):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive integer, got jobs={jobs!r}")
        self.scale, self.dataset, self.log, self.jobs = scale, dataset, log, jobs
        self.base = Config(data=data, lr=BASE_LR, steps=scale.steps, eval_every=scale.eval_every, validation=VALIDATION)
        self.seeds = [seed + i for i in range(scale.seeds)]
        self.store = store  # a folder keeping every finished run, so that a rerun picks them up
        self._done: dict[Config, Run] = {}
        self.tuning: dict[str, dict] = {}  # by Lab.tune: each tuned condition's choice and the grid's accuracies
        self.name = ""  # what tuning's keys begin with: a sibling's data and model
        # what a kept run depends on besides its configuration: the data's values and the code
        self.fingerprint = _fingerprint(dataset)
        self._kept = _read_store(store)  # every kept run, read (and checked) before anything trains

    def sibling(self, dataset: data_module.Dataset, data: str, **base) -> Lab:
        """A lab on other data, its base configuration changed by ``base``, with this one's scale,
        seeds, jobs, store and tuning record."""
        other = copy.copy(self)
        other.dataset, other.base, other._done = dataset, self.base.replace(data=data, **base), {}
        other.fingerprint = _fingerprint(dataset)
        other.name = f"{data}, {other.base.model}: "
        return other

    def _configs(self, changes: dict) -> list[Config]:
        return [self.base.replace(seed=seed, **changes) for seed in self.seeds]

    def prefetch(self, *changes: dict) -> None:
        """Train every seed of each configuration not trained yet, ``jobs`` at a time.

        With ``store``, runs kept there by an earlier call (an interrupted reproduce with
        the same output folder) are read instead of trained, and each new run is written
        there as soon as it ends."""
        self._train([c for change in changes for c in self._configs(change)])

    def tune(self, *changes: dict, grid: dict[str, tuple[float, ...]] | None = None) -> list[dict]:
        """Each of ``changes`` with the optimizer and learning rate of ``grid`` (LEARNING_RATES
        by default) under which the first seed's run reaches the highest validation accuracy
        (the first of equals in the grid's order); every seed is then trained with it. Nothing
        is chosen on the test set. The candidates' accuracies are kept in ``tuning``."""
        grid = LEARNING_RATES if grid is None else grid
        first = self.seeds[0]
        options = [[{**c, "optimizer": o, "lr": lr} for o, rates in grid.items() for lr in rates] for c in changes]
        self._train([self.base.replace(seed=first, **option) for candidates in options for option in candidates])
        chosen = []
        for change, candidates in zip(changes, options, strict=True):
            scores = [self._done[self.base.replace(seed=first, **o)].chosen["val_accuracy"] for o in candidates]
            best = candidates[scores.index(max(scores))]
            named = {k: v for k, v in change.items() if k == "norm" or getattr(self.base, k) != v}
            key = self.name + ", ".join(f"{k}={v}" for k, v in named.items())
            accuracies = dict(zip(map(_setting, candidates), scores, strict=True))
            self.tuning[key] = {"chosen": _setting(best), "validation": accuracies}
            chosen.append(best)
        self.prefetch(*chosen)
        return chosen

    def _train(self, configs: list[Config]) -> None:
        pending = list(dict.fromkeys(c for c in configs if c not in self._done))
        for config in list(pending):
            kept = self._load(config)
            if kept is not None:
                self._done[config] = kept
                pending.remove(config)
                if self.log:
                    self.log(f"  kept  {_describe(config)}")
        if self.log:
            for config in pending:
                self.log(f"  train {_describe(config)}")
        if self.jobs == 1 or len(pending) < 2:
            for config in pending:
                self._finish(config, _pack(_train_one_thread(config, self.dataset)))
            return
        global _WORKER_DATASET
        _WORKER_DATASET = self.dataset  # forked workers inherit it; nothing is pickled to them
        context = multiprocessing.get_context("fork")
        try:
            with ProcessPoolExecutor(
                min(self.jobs, len(pending)), mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
            ) as pool:
                futures = {pool.submit(_train_in_worker, config): config for config in pending}
                for future in as_completed(futures):
                    self._finish(futures[future], future.result())
        finally:
            _WORKER_DATASET = None

    def _path(self, config: Config) -> str:
        text = json.dumps({"config": dataclasses.asdict(config), "fingerprint": self.fingerprint}, sort_keys=True)
        return os.path.join(self.store, f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.pt")

    def _finish(self, config: Config, packed: tuple[list[dict], bytes]) -> None:
        self._done[config] = _unpack(config, packed, self.dataset)
        if self.store:
            os.makedirs(self.store, exist_ok=True)
            metrics, state = packed
            kept = {
                "config": dataclasses.asdict(config), "fingerprint": self.fingerprint, "metrics": metrics,
                "state": state,
            }  # fmt: skip
            save_atomically(kept, self._path(config))

    def _load(self, config: Config) -> Run | None:
        if not self.store:
            return None
        path = self._path(config)
        kept = self._kept.get(os.path.basename(path))
        if kept is None or kept["config"] != dataclasses.asdict(config) or kept.get("fingerprint") != self.fingerprint:
            return None
        try:
            return _unpack(config, (kept["metrics"], kept["state"]), self.dataset)
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{path}: the kept run does not fit its configuration's model: {first}") from None

    def runs(self, **changes) -> list[Run]:
        """One run per seed of the base configuration with ``changes``."""
        self.prefetch(changes)
        return [self._done[config] for config in self._configs(changes)]


_KEPT_KEYS = {"config": dict, "metrics": list, "state": bytes}


def _read_store(store: str | None) -> dict[str, dict]:
    """Every kept run in ``store`` by file name; CheckpointError on the first unreadable one."""
    if not store or not os.path.isdir(store):
        return {}
    names = sorted(name for name in os.listdir(store) if name.endswith(".pt"))
    return {name: load_kept(os.path.join(store, name), _KEPT_KEYS, what="kept run") for name in names}


def _fingerprint(dataset: data_module.Dataset) -> str:
    """A hash of the data's values and of this package's code and its dependencies' versions."""
    import numba
    import numpy

    digest = hashlib.sha1()
    for tensor in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    digest.update(f"torch {torch.__version__} numba {numba.__version__} numpy {numpy.__version__}".encode())
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root, _directories, files in sorted(os.walk(package)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as handle:
                    digest.update(name.encode() + handle.read())
    return digest.hexdigest()


def _train_one_thread(config: Config, dataset: data_module.Dataset) -> Run:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, dataset, progress=False)
    finally:
        torch.set_num_threads(threads)


_WORKER_DATASET: data_module.Dataset | None = None


def _train_in_worker(config: Config) -> tuple[list[dict], bytes]:
    """In a forked worker (one torch thread): the metrics and the model's state as bytes.

    Bytes, not tensors: torch would pass tensors through shared memory with a parallel
    copy, and GNU OpenMP must not start a thread team in a forked child.
    """
    return _pack(train(config, _WORKER_DATASET, progress=False))


def _pack(run: Run) -> tuple[list[dict], bytes]:
    buffer = io.BytesIO()
    torch.save(run.model.state_dict(), buffer)
    return run.metrics, buffer.getvalue()


def _unpack(config: Config, packed: tuple[list[dict], bytes], dataset: data_module.Dataset) -> Run:
    metrics, state = packed
    model = build_model(config, dataset)
    model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return Run(config, model, metrics)  # in training mode, as train() leaves it


def _describe(config: Config) -> str:
    parts = [f"norm={config.norm}", f"activation={config.activation}", f"lr={config.lr:g}"]
    if config.optimizer != "sgd":
        parts.append(f"optimizer={config.optimizer}")
    if config.model != "mlp":
        parts.append(f"model={config.model}, data={config.data}")
    if config.depth != 3:
        parts.append(f"depth={config.depth}")
    if config.placement != "before":
        parts.append(f"placement={config.placement}")
    if config.dropout:
        parts.append(f"dropout={config.dropout}")
    if config.batch_size != 60:
        parts.append(f"batch={config.batch_size}")
    if config.bn_momentum != 0.1:
        parts.append(f"bn_momentum={config.bn_momentum}")
    if config.same_label != 1:
        parts.append(f"same_label={config.same_label}")
    if config.measure:
        parts.append("measured")
    return ", ".join(parts) + f", seed={config.seed}, steps={config.steps}"


# --------------------------------------------------------------- 1. Figure 1


def _drift(run: Run) -> float:
    """How far the probed percentiles move over training, in units of their average spread
    (claims._movement of each of the 15th, 50th and 85th, averaged)."""
    spread = _mean([r["probe_p85"] - r["probe_p15"] for r in run.metrics])
    keys = ("probe_p15", "probe_p50", "probe_p85")
    return _mean([_movement([r[k] for r in run.metrics], spread) for k in keys])


def fig1(lab: Lab) -> Result:
    tuned_bn, tuned_none = lab.tune({"norm": "bn"}, {"norm": "none"})
    named = {"with batch norm": lab.runs(**tuned_bn), "without": lab.runs(**tuned_none)}
    with_bn, without = named["with batch norm"], named["without"]
    faster, target, (steps_bn, steps_none) = trains_faster(
        "Batch norm trains faster: higher test accuracy after fewer steps (Figure 1a).", with_bn, without
    )
    drifts = {label: [_drift(r) for r in runs] for label, runs in named.items()}
    rows = [
        [label, _settings(runs), _pm(_chosen(runs)), _steps_text(steps), _pm(drifts[label], 2)]
        for (label, runs), steps in zip(named.items(), (steps_bn, steps_none), strict=True)
    ]
    stable = ratio(drifts["with batch norm"], drifts["without"])
    seeds = rule(len(lab.seeds))
    claims = [
        faster,
        Claim(
            "With batch norm the distribution of a sigmoid's input stays stable during training (Figure 1b, c).",
            f"movement of the 15th/50th/85th percentiles over training (their root-mean-square deviation from "
            f"their mean), in units of their spread: {_pm(drifts['with batch norm'], 2)} with, "
            f"{_pm(drifts['without'], 2)} without",
            below(stable, math.log(0.5)),
            f"holds if the ratio with / without lies below 1/2 ({seeds}, paired, on the log scale; {_tuned()}); "
            "does not hold if it lies at or above 1/2",
            f"movement ratio {_ratio(stable)}",
        ),
    ]
    figures = {
        "Test accuracy during training (mean and range over seeds)": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", "Figure 1a: MLP, sigmoid, 3 x 100"
        ),
        "Input to one sigmoid of the last hidden layer: 15th, 50th, 85th percentiles over the test set": (
            plots.percentile_bands(_metrics(named), "Figure 1b, c")
        ),
    }
    columns = ["network", "tuned learning rate", "test accuracy", "steps to reach target", "percentile movement"]
    return Result("fig1", "Figure 1: training speed and the sigmoid's input", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


# ------------------------------------------------------ 2. learning rates


def learning_rates(lab: Lab) -> Result:
    """The paper's protocol: the baseline (no batch norm) at its tuned learning rate, batch norm
    at that rate and at 5 and 30 times it."""
    multipliers = (1, 5, 30)
    (baseline,) = lab.tune({"norm": "none"})
    base_lr = baseline["lr"]
    lab.prefetch(*({"norm": norm, "lr": base_lr * k} for norm in ("none", "bn") for k in multipliers))
    named = {}
    for norm, label in (("none", "baseline"), ("bn", "BN")):
        for k in multipliers:
            name = label if k == 1 else f"{label}-x{k}"
            named[name] = lab.runs(norm=norm, lr=base_lr * k)
    target = min(_chosen(named["baseline"], _watched(named["baseline"][0])))  # every baseline seed reaches it
    rows = []
    steps = {}
    for name, runs in named.items():
        steps[name] = [_steps_to(run, target) for run in runs]
        rows.append([name, f"{runs[0].config.lr:g}", _steps_text(steps[name]), _pm(_chosen(runs))])
    best = {name: _chosen(runs) for name, runs in named.items()}
    keeps = {name: paired(best[name], best["baseline"]) for name in ("BN-x5", "BN-x30", "baseline-x30")}
    fewer = paired(_log_steps(named["BN-x5"], target), _log_steps(named["baseline"], target))
    seeds = rule(len(lab.seeds))
    claims = [
        Claim(
            "Batch norm allows much higher learning rates (the paper's BN-x5 and BN-x30).",
            f"test accuracy of the baseline {_pm(best['baseline'])}; BN-x5 {_pm(best['BN-x5'])}, "
            f"BN-x30 {_pm(best['BN-x30'])}; without batch norm at x30 {_pm(best['baseline-x30'])}",
            every(above(keeps["BN-x5"], -MARGIN), above(keeps["BN-x30"], -MARGIN), below(keeps["baseline-x30"], 0.0)),
            f"holds if the test accuracy of BN-x5 and of BN-x30 minus the baseline's lies above -{MARGIN} and that "
            f"of the network without batch norm at x30 minus the baseline's lies below 0 ({seeds}, paired; the "
            f"baseline, without batch norm, at the learning rate of {_grid_text()} best on its first seed's "
            "validation accuracy, the others at multiples of it); does not hold if any lies beyond its bound",
            ", ".join(f"{name} - baseline {iv.text(signed=True)}" for name, iv in keeps.items()),
        ),
        Claim(
            "With a 5x learning rate, batch norm reaches the baseline's accuracy in far fewer steps "
            "(14x fewer on ImageNet).",
            f"steps to {target:.3f}: baseline {_steps_text(steps['baseline'])}, BN-x5 {_steps_text(steps['BN-x5'])}",
            below(fewer, math.log(0.5)),
            f"holds if the ratio of steps BN-x5 / baseline lies below 1/2 ({seeds}, paired, on the log scale; a "
            "run that never gets there counted one evaluation past its end); does not hold if it lies at or above 1/2",
            f"steps ratio {_ratio(fewer)}",
        ),
    ]
    figures = {
        "Test accuracy at 1x, 5x and 30x the baseline's tuned learning rate": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", f"Learning rates (base {base_lr:g}, tuned)"
        )
    }
    columns = ["model", "learning rate", f"steps to validation accuracy {target:.3f}", "test accuracy"]
    return Result("learning-rates", "Higher learning rates (the paper's Figure 3)", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


# ---------------------------------------------------------------- 3. sigmoid


def sigmoid(lab: Lab) -> Result:
    depth = lab.scale.sigmoid_depth
    conditions = [{"norm": n, "activation": "sigmoid", "depth": depth} for n in ("bn", "none")]
    conditions.append({"norm": "none", "activation": "relu", "depth": depth})  # what "trainable" is measured by
    named = {
        f"{tuned['activation']}, {'with' if tuned['norm'] == 'bn' else 'without'} BN": lab.runs(**tuned)
        for tuned in lab.tune(*conditions, grid=TRAINABILITY)
    }
    chance = _chance(lab)
    plain, with_bn, relu = (_chosen(named[k]) for k in ("sigmoid, without BN", "sigmoid, with BN", "relu, without BN"))
    rows = [[label, _settings(runs), _pm(_chosen(runs)), _pm(_chosen(runs, "val_accuracy"))]
            for label, runs in named.items()]  # fmt: skip
    stuck = interval(plain)
    trains = paired(with_bn, [0.8 * a for a in relu])
    claims = [
        Claim(
            "Batch norm makes sigmoid networks trainable (a sigmoid Inception without it never exceeded 0.1%).",
            f"{depth} hidden sigmoid layers: test accuracy {_pm(plain)} without batch norm, "
            f"{_pm(with_bn)} with (chance {chance:.3f}; ReLU without batch norm {_pm(relu)})",
            every(below(stuck, chance + 0.05), above(trains, 0.0)),
            f"holds if the test accuracy of the sigmoid network without batch norm lies below chance + 0.05 and "
            f"with batch norm minus 80% of the ReLU network's lies above 0 ({rule(len(lab.seeds))}; the second "
            f"paired; {_tuned(TRAINABILITY)}); does not hold if either lies beyond its bound",
            f"without batch norm {stuck.text()}; with batch norm - 0.8 x ReLU {trains.text(signed=True)}",
        )
    ]
    figures = {
        f"Test accuracy, {depth} hidden layers": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", f"Sigmoid and ReLU, {depth} x 100"
        )
    }
    columns = ["network", "tuned optimizer and learning rate", "test accuracy", "validation accuracy"]
    return Result("sigmoid", "Sigmoid networks", columns, rows, claims, figures, _metrics(named))


# --------------------------------------------------------- 4. regularization

DROPOUT = 0.3


def gap_at_fit(run: Run, level: float) -> float:
    """Train minus test accuracy at the first evaluation whose training accuracy reaches ``level``
    (so that networks are compared at the same fit, not at their different best accuracies)."""
    record = next(r for r in run.metrics if r["train_accuracy"] >= level)
    return record["train_accuracy"] - record["test_accuracy"]


def regularization(lab: Lab) -> Result:
    conditions = [{"norm": n, "dropout": d} for n in ("none", "bn") for d in (0.0, DROPOUT)]
    labels = ["neither", f"dropout {DROPOUT}", "batch norm", "both"]
    named = {label: lab.runs(**tuned) for label, tuned in zip(labels, lab.tune(*conditions), strict=True)}
    gaps = {
        label: [r.chosen["train_accuracy"] - r.chosen["test_accuracy"] for r in runs] for label, runs in named.items()
    }
    tests = {label: _chosen(runs) for label, runs in named.items()}
    rows = [[label, _settings(runs), _pm(tests[label]), _pm(_chosen(runs, "train_accuracy")), _pm(gaps[label])]
            for label, runs in named.items()]  # fmt: skip
    dropout_label = f"dropout {DROPOUT}"
    compared = named["batch norm"] + named["neither"]
    level = min(max(record["train_accuracy"] for record in run.metrics) for run in compared)  # all reach it
    at_fit = {label: [gap_at_fit(run, level) for run in named[label]] for label in ("batch norm", "neither")}
    narrower = paired(at_fit["batch norm"], at_fit["neither"])
    replaces = paired(tests["batch norm"], tests[dropout_label])
    seeds = rule(len(lab.seeds))
    claims = [
        Claim(
            "Batch norm regularizes: a smaller gap between training and test accuracy.",
            f"train - test accuracy where the training accuracy first reaches {level:.3f} (the lowest best of "
            f"both over seeds): {_pm(at_fit['batch norm'])} with batch norm, {_pm(at_fit['neither'])} with "
            f"neither; at each run's chosen evaluation {_pm(gaps['batch norm'])} and {_pm(gaps['neither'])}",
            below(narrower, 0.0),
            f"holds if the gap at that training accuracy with batch norm minus with neither lies below 0 ({seeds}, "
            f"paired; {_tuned()}); does not hold if it lies at or above 0",
            f"gap with - without {narrower.text(signed=True)}",
        ),
        Claim(
            "Batch norm can replace dropout.",
            f"test accuracy {_pm(tests['batch norm'])} with batch norm alone, {_pm(tests[dropout_label])} "
            f"with dropout alone, {_pm(tests['both'])} with both",
            above(replaces, -MARGIN),
            f"holds if batch norm alone minus dropout alone lies above -{MARGIN} ({seeds}, paired; {_tuned()}); "
            f"does not hold if it lies at or below -{MARGIN}",
            f"batch norm - dropout {replaces.text(signed=True)}",
        ),
    ]
    figures = {
        "Test accuracy and train - test gap": plots.bars(
            {"test accuracy": tests, "train - test gap": gaps}, "accuracy", "Regularization"
        )
    }
    columns = ["regularization", "tuned learning rate", "test accuracy", "train accuracy", "train - test gap"]
    return Result("regularization", "Regularization and dropout", columns, rows, claims, figures, _metrics(named))


# ------------------------------------------------------------- 5. batch size


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Test accuracy with batch statistics over batches of ``batch`` (a copy, so no buffer changes)."""
    copied = copy.deepcopy(model).train()
    correct = 0
    usable = len(y) - len(y) % batch if len(y) >= batch else len(y)
    for start in range(0, usable, batch):
        correct += (copied(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum().item()
    return correct / usable


LOSS = 0.02  # what batch norm must be shown to lose before renorm's recovery is judged


def _recovery(lost: list[float], recovered: list[float]) -> tuple[str, str]:
    """The rule of both renorm claims, per seed: what batch norm loses, and whether renorm wins
    back more than half of it. (verdict, the intervals as text)."""
    loss = interval(lost)
    gain = paired(recovered, [0.5 * value for value in lost])
    verdict = above(gain, 0.0) if above(loss, LOSS) == HOLDS else UNSURE
    return verdict, f"lost {loss.text(signed=True)}; recovered - half the loss {gain.text(signed=True)}"


def _recovery_rule(where: str, seeds: int) -> str:
    return (
        f"holds if what batch norm loses {where} lies above {LOSS} and what renorm wins back minus half of that "
        f"lies above 0 ({rule(seeds)}, paired); does not hold if batch norm loses and renorm's gain minus half "
        "the loss lies at or below 0; inconclusive otherwise (no loss shown, or the interval straddles 0)"
    )


def _renorm_claim(per_size: dict, sizes, reference: int) -> Claim:
    """Batch renorm at the small batches (at most 8) against batch norm there and at ``reference``."""
    small = [s for s in sizes if s <= 8] or [sizes[0]]
    seeds = range(len(per_size[reference][0]))
    bn_small = [_mean([per_size[s][0][i] for s in small]) for i in seeds]
    renorm_small = [_mean([per_size[s][3][i] for s in small]) for i in seeds]
    bn_reference = per_size[reference][0]
    lost = [r - b for r, b in zip(bn_reference, bn_small, strict=True)]
    recovered = [r - b for r, b in zip(renorm_small, bn_small, strict=True)]
    verdict, shown = _recovery(lost, recovered)
    batches = ", ".join(str(s) for s in small)
    return Claim(
        "Batch renormalization recovers most of batch norm's accuracy at small batches (Ioffe 2017).",
        f"test accuracy at batches {batches}: batch norm {_mean(bn_small):.3f}, batch renorm "
        f"{_mean(renorm_small):.3f}; batch norm at batch {reference}: {_mean(bn_reference):.3f} (lost at small "
        f"batches {_mean(lost):+.3f}, recovered by renorm {_mean(recovered):+.3f})",
        verdict,
        _recovery_rule("at the small batches", len(lost)),
        shown,
    )


# Ioffe 2017, section 4.3: batch norm with non-i.i.d. batches (there 32 examples of 16 labels,
# 2 each, on ImageNet's 1000 labels). MNIST-1D has 10 labels, so that a batch of 32 drawn at
# random already holds about 3 of each; here a batch holds NONIID_LABELS labels, 8 examples each.
NONIID_BATCH, NONIID_LABELS = 32, 4


def _noniid_claim(iid: list[float], noniid: list[float], renormed: list[float]) -> Claim:
    """Batch renorm with non-i.i.d. batches against batch norm with them and with i.i.d. ones."""
    lost = [a - b for a, b in zip(iid, noniid, strict=True)]
    recovered = [a - b for a, b in zip(renormed, noniid, strict=True)]
    verdict, shown = _recovery(lost, recovered)
    per_label = NONIID_BATCH // NONIID_LABELS
    return Claim(
        "With non-i.i.d. batches batch norm loses accuracy and batch renorm recovers most of it (Ioffe 2017).",
        f"test accuracy at batch {NONIID_BATCH}: batch norm {_mean(iid):.3f} with i.i.d. batches, "
        f"{_mean(noniid):.3f} with batches of {NONIID_LABELS} labels ({per_label} examples each; lost "
        f"{_mean(lost):+.3f}); batch renorm with them {_mean(renormed):.3f} (recovered {_mean(recovered):+.3f})",
        verdict,
        _recovery_rule("with the non-i.i.d. batches", len(lost)),
        shown,
    )


def batch_size(lab: Lab) -> Result:
    """The same number of steps and the same learning rate at every batch size (the claim is about
    the batch's statistics, not about how many updates a run gets), with and without batch norm:
    batch norm's effect is the difference between the two; and batch renorm (Ioffe 2017), which
    the paper says recovers most of it at small batches."""
    sizes = lab.scale.batch_sizes
    lines: dict[str, list[list[float]]] = {
        "with batch norm, eval mode (running statistics)": [],
        "with batch norm, train mode (batch statistics)": [],
        "without batch norm": [],
        "with batch renorm, eval mode": [],
    }
    rows, per_size, metrics = [], {}, {}

    def common(size: int) -> dict:
        return {"batch_size": size}

    noniid = {"batch_size": NONIID_BATCH, "same_label": NONIID_BATCH // NONIID_LABELS}
    lab.prefetch(
        *({"norm": norm, **common(size)} for size in sizes for norm in ("bn", "none", "renorm")),
        {"norm": "bn", "batch_size": NONIID_BATCH}, {"norm": "bn", **noniid}, {"norm": "renorm", **noniid},
    )  # fmt: skip
    for size in sizes:
        steps = lab.base.steps
        with_bn, without = lab.runs(norm="bn", **common(size)), lab.runs(norm="none", **common(size))
        renormed = lab.runs(norm="renorm", **common(size))
        accuracy = _chosen(with_bn)
        batch_mode = [train_mode_accuracy(r.model, lab.dataset.x_test, lab.dataset.y_test, size) for r in with_bn]
        plain = _chosen(without)
        effect = [a - b for a, b in zip(accuracy, plain, strict=True)]
        renorm_accuracy = _chosen(renormed)
        per_size[size] = (accuracy, batch_mode, plain, renorm_accuracy, effect)
        metrics[f"batch {size}, with batch norm"] = [r.metrics for r in with_bn]
        metrics[f"batch {size}, without"] = [r.metrics for r in without]
        metrics[f"batch {size}, with batch renorm"] = [r.metrics for r in renormed]
        rows.append(
            [str(size), str(steps), _pm(accuracy), _pm(batch_mode), _pm(plain), _pm(effect), _pm(renorm_accuracy)]
        )
    for i in range(len(lab.seeds)):
        for line, index in zip(lines.values(), range(4), strict=True):
            line.append([per_size[s][index][i] for s in sizes])
    smallest = sizes[0]
    reference = max(s for s in sizes if s <= 64)
    small_effect, ref_effect = _mean(per_size[smallest][4]), _mean(per_size[reference][4])
    gap = _mean(per_size[smallest][1]) - _mean(per_size[smallest][0])
    claims = [
        Claim(
            "Batch norm needs a large enough batch: with batches of 1 to 3 it loses its effect.",
            f"test accuracy with minus without batch norm: {small_effect:+.3f} at batch {smallest}, "
            f"{ref_effect:+.3f} at batch {reference}; at batch {smallest} train mode minus eval mode {gap:+.3f}",
            every(above(interval(per_size[reference][4]), 0.0), below(interval(per_size[smallest][4]), MARGIN)),
            f"holds if the effect (with minus without batch norm, per seed) at batch {reference} lies above 0 and "
            f"at batch {smallest} below {MARGIN} ({rule(len(lab.seeds))}); does not hold if either lies beyond "
            "its bound",
            f"effect at batch {reference} {interval(per_size[reference][4]).text(signed=True)}, at batch "
            f"{smallest} {interval(per_size[smallest][4]).text(signed=True)}",
        ),
        _renorm_claim(per_size, sizes, reference),
    ]
    iid_runs = lab.runs(norm="bn", batch_size=NONIID_BATCH)
    noniid_runs, renorm_runs = lab.runs(norm="bn", **noniid), lab.runs(norm="renorm", **noniid)
    claims.append(_noniid_claim(_chosen(iid_runs), _chosen(noniid_runs), _chosen(renorm_runs)))
    metrics[f"batch {NONIID_BATCH}, i.i.d., with batch norm"] = [r.metrics for r in iid_runs]
    metrics[f"batch {NONIID_BATCH}, {NONIID_LABELS} labels, with batch norm"] = [r.metrics for r in noniid_runs]
    metrics[f"batch {NONIID_BATCH}, {NONIID_LABELS} labels, with batch renorm"] = [r.metrics for r in renorm_runs]
    figures = {
        f"Test accuracy against batch size: {lab.base.steps} steps, learning rate {BASE_LR:g}": (
            plots.versus(list(sizes), lines, "batch size", "test accuracy", "Batch size")
        )
    }
    columns = [
        "batch", "steps", "BN, eval mode", "BN, train mode", "without BN", "BN effect (with - without)",
        "batch renorm, eval mode",
    ]  # fmt: skip
    return Result("batch-size", "Batch size", columns, rows, claims, figures, metrics)


# -------------------------------------------------------------- 6. placement


def placement(lab: Lab) -> Result:
    tuned = lab.tune({"norm": "bn"}, {"norm": "bn", "placement": "after"})
    named = {label: lab.runs(**t) for label, t in zip(("before the activation", "after"), tuned, strict=True)}
    before, after = _chosen(named["before the activation"]), _chosen(named["after"])
    difference = paired(before, after)
    rows = [[label, _settings(runs), _pm(_chosen(runs)), _pm(_chosen(runs, "val_accuracy"))]
            for label, runs in named.items()]  # fmt: skip
    claims = [
        Claim(
            "Batch norm before or after the activation makes little difference.",
            f"test accuracy {_pm(before)} before, {_pm(after)} after",
            within(difference, MARGIN),
            f"holds if before minus after lies inside (-{MARGIN}, {MARGIN}) ({rule(len(lab.seeds))}, paired; "
            f"{_tuned()}); does not hold if it lies wholly outside it; inconclusive otherwise",
            f"before - after {difference.text(signed=True)}",
        )
    ]
    figures = {
        "Test accuracy, batch norm before and after the sigmoid": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", "Placement"
        )
    }
    columns = ["batch norm", "tuned learning rate", "test accuracy", "validation accuracy"]
    return Result("placement", "Before or after the activation", columns, rows, claims, figures, _metrics(named))


# ----------------------------------------------------- 7. inference statistics


SMALL_LOSS = 0.1  # "batch statistics of small batches fail": at least this much below the running average


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Every batch-norm layer normalizes with the statistics of the batch it sees, written plainly
    (so that a batch of one example gives beta, as the formula does, where the layers refuse it)."""
    originals = {}
    for module in model.modules():
        if isinstance(module, (layers._BatchNorm, nn.modules.batchnorm._BatchNorm)):
            originals[module] = module.forward

            def forward(x, module=module):
                dims = [d for d in range(x.dim()) if d != 1]
                mean = x.mean(dims, keepdim=True)
                var = x.var(dims, unbiased=False, keepdim=True)
                shape = [1, -1] + [1] * (x.dim() - 2)
                y = (x - mean) / torch.sqrt(var + module.eps)
                if module.weight is not None:
                    y = y * module.weight.view(shape) + module.bias.view(shape)
                return y

            module.forward = forward
    try:
        yield model
    finally:
        for module, forward in originals.items():
            module.forward = forward


@torch.no_grad()
def _batch_stat_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    with batch_statistics(model):
        for start in range(0, len(y), batch):
            correct += (model(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum().item()
    return correct / len(y)


def inference_statistics(lab: Lab) -> Result:
    x, y = lab.dataset.x_test, lab.dataset.y_test
    methods: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        methods.setdefault(name, []).append(value)

    (tuned,) = lab.tune({"norm": "bn"})  # one network, its statistics at inference compared
    lab.prefetch(*({**tuned, "bn_momentum": momentum} for momentum in (0.1, 0.01, None)))
    runs = {momentum: lab.runs(**tuned, bn_momentum=momentum) for momentum in (0.1, 0.01, None)}
    for i in range(len(lab.seeds)):
        model = runs[0.1][i].model
        add("batch statistics, batch of 1", _batch_stat_accuracy(model, x, y, 1))
        add("batch statistics, batch of 2", _batch_stat_accuracy(model, x, y, 2))
        add("batch statistics, whole test set", _batch_stat_accuracy(model, x, y, len(y)))
        for momentum, label in ((0.1, "running average, momentum 0.1"), (0.01, "running average, momentum 0.01"),
                                (None, "cumulative average (momentum None)")):  # fmt: skip
            trained = runs[momentum][i].model.eval()
            add(label, evaluate(trained, x, y)[1])
        population = copy.deepcopy(model)
        batches = torch.split(lab.dataset.x_train, 60)
        population_statistics(population, batches, estimator="exact")
        add("population statistics (Algorithm 2)", evaluate(population.eval(), x, y)[1])
    rows = [[name, _pm(values)] for name, values in methods.items()]
    chance = _chance(lab)
    whole = _mean(methods["batch statistics, whole test set"])
    running = _mean(methods["running average, momentum 0.1"])
    population_mean = _mean(methods["population statistics (Algorithm 2)"])
    single = _mean(methods["batch statistics, batch of 1"])
    whole_values = methods["batch statistics, whole test set"]
    running_iv = paired(methods["running average, momentum 0.1"], whole_values)
    population_iv = paired(methods["population statistics (Algorithm 2)"], whole_values)
    small_iv = paired(methods["batch statistics, batch of 2"], methods["running average, momentum 0.1"])
    claims = [
        Claim(
            "At inference, running averages or statistics of the training set replace batch statistics; "
            "batch statistics of small batches fail.",
            f"test accuracy: running average {running:.3f}, population {population_mean:.3f}, whole test set as "
            f"one batch {whole:.3f}, batch of 1 {single:.3f}, batch of 2 "
            f"{_mean(methods['batch statistics, batch of 2']):.3f} (chance {chance:.3f})",
            every(within(running_iv, MARGIN), within(population_iv, MARGIN), below(small_iv, -SMALL_LOSS)),
            f"holds if the running average minus the whole-test-set batch statistics and the population statistics "
            f"minus them both lie inside (-{MARGIN}, {MARGIN}), and batches of 2 minus the running average lies "
            f"below -{SMALL_LOSS} ({rule(len(lab.seeds))}, paired); does not hold if any lies wholly beyond its "
            "bound; a batch of 1 is shown but not judged: it gives beta, chance accuracy, by construction",
            f"running - whole set {running_iv.text(signed=True)}, population - whole set "
            f"{population_iv.text(signed=True)}, batch of 2 - running {small_iv.text(signed=True)}",
        )
    ]
    figures = {
        "Test accuracy by the statistics used at inference": plots.bars(
            {"test accuracy": methods}, "test accuracy", "Inference statistics"
        )
    }
    columns = ["statistics at inference", "test accuracy"]
    metrics = {f"bn_momentum {m}": [r.metrics for r in rs] for m, rs in runs.items()}
    return Result("inference-statistics", "Statistics at inference", columns, rows, claims, figures, metrics)


EXPERIMENTS: dict[str, Callable[[Lab], Result]] = {
    "fig1": fig1,
    "learning-rates": learning_rates,
    "sigmoid": sigmoid,
    "regularization": regularization,
    "batch-size": batch_size,
    "placement": placement,
    "inference-statistics": inference_statistics,
    "landscape": optimization.landscape,
    "ics": optimization.ics,
    "noisy-bn": optimization.noisy_bn,
    "lp-norms": optimization.lp_norms,
    "normalizations": optimization.normalizations,
    "images": images.images,
}
