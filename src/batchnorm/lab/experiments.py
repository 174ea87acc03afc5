"""The seven experiments: each trains networks over several seeds and judges a claim.

Every claim gets a verdict from a rule written here (``holds``, ``does not hold``,
``inconclusive``) and shown in the report with the numbers it was decided on.
All runs share one base configuration, the paper's MLP (3 hidden layers of 100
sigmoid units, batch 60, SGD with momentum 0.9) at learning rate BASE_LR, which is
where the network without batch norm trains best on MNIST-1D at the quick scale
(0.05: best test accuracy 0.32; 0.25: 0.40; 1.5 diverges). Identical
configurations are trained once and shared between experiments.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import layers
from ..stats import population_statistics
from . import data as data_module
from . import plots
from .checkpoints import CheckpointError, save_atomically
from .checkpoints import load as load_kept
from .train import Config, Run, build_model, evaluate, train

__all__ = ["EXPERIMENTS", "SCALES", "Claim", "Lab", "Result", "Scale"]

BASE_LR = 0.05
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Scale:
    name: str
    steps: int
    eval_every: int
    seeds: int
    batch_examples: int  # examples seen by each run of the batch-size experiment
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 64, 256)
    sigmoid_depth: int = 6


SCALES = {
    "tiny": Scale("tiny", steps=40, eval_every=20, seeds=2, batch_examples=480, batch_sizes=(2, 8, 64)),
    "quick": Scale("quick", steps=1500, eval_every=100, seeds=3, batch_examples=12_000),
    # the paper's Figure 1: 50,000 steps of batch 60; the batch-size runs see 60 epochs of MNIST-1D
    "full": Scale("full", steps=50_000, eval_every=1000, seeds=3, batch_examples=240_000),
}


@dataclass
class Claim:
    claim: str  # as the seeds make it
    measured: str
    verdict: str
    rule: str


@dataclass
class Result:
    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    claims: list[Claim]
    figures: dict[str, bytes] = field(default_factory=dict)  # caption -> PNG
    metrics: dict[str, list[list[dict]]] = field(default_factory=dict)  # label -> per-seed records


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
        self.base = Config(data=data, lr=BASE_LR, steps=scale.steps, eval_every=scale.eval_every)
        self.seeds = [seed + i for i in range(scale.seeds)]
        self.store = store  # a folder keeping every finished run, so that a rerun picks them up
        self._done: dict[Config, Run] = {}
        # what a kept run depends on besides its configuration: the data's values and the code
        self.fingerprint = _fingerprint(dataset)
        self._kept = _read_store(store)  # every kept run, read (and checked) before anything trains

    def _configs(self, changes: dict) -> list[Config]:
        return [self.base.replace(seed=seed, **changes) for seed in self.seeds]

    def prefetch(self, *changes: dict) -> None:
        """Train every seed of each configuration not trained yet, ``jobs`` at a time.

        With ``store``, runs kept there by an earlier call (an interrupted reproduce with
        the same output folder) are read instead of trained, and each new run is written
        there as soon as it ends."""
        pending = list(dict.fromkeys(c for change in changes for c in self._configs(change) if c not in self._done))
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
    return ", ".join(parts) + f", seed={config.seed}, steps={config.steps}"


# ------------------------------------------------------------------ helpers


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


def _steps_to(run: Run, target: float) -> int | None:
    """The first evaluated step at which test accuracy reaches ``target``."""
    for record in run.metrics:
        if record["test_accuracy"] >= target:
            return record["step"]
    return None


def _steps_text(steps: list[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    if not reached:
        return "never"
    text = f"{_mean(reached):.0f}"
    return text if len(reached) == len(steps) else f"{text} ({len(reached)} of {len(steps)} seeds)"


def _verdict(holds: bool, fails: bool) -> str:
    return HOLDS if holds else FAILS if fails else UNSURE


def _metrics(named: dict[str, list[Run]]) -> dict[str, list[list[dict]]]:
    return {label: [run.metrics for run in runs] for label, runs in named.items()}


def _chance(lab: Lab) -> float:
    return 1.0 / lab.dataset.num_classes


# --------------------------------------------------------------- 1. Figure 1


def _drift(run: Run) -> float:
    """How far the probed percentiles travel over training, in units of their average spread."""
    keys = ("probe_p15", "probe_p50", "probe_p85")
    travel = sum(
        abs(later[k] - earlier[k]) for earlier, later in zip(run.metrics, run.metrics[1:], strict=False) for k in keys
    )
    spread = _mean([r["probe_p85"] - r["probe_p15"] for r in run.metrics])
    return travel / max(spread, 1e-12)


def fig1(lab: Lab) -> Result:
    lab.prefetch({"norm": "bn"}, {"norm": "none"})
    named = {"with batch norm": lab.runs(norm="bn"), "without": lab.runs(norm="none")}
    with_bn, without = named["with batch norm"], named["without"]
    target = min(_final(without))  # every seed without batch norm reaches it
    steps_bn = [_steps_to(run, target) for run in with_bn]
    steps_none = [_steps_to(run, target) for run in without]
    rows = [
        [label, _pm(_final(runs)), _pm(_best(runs)), _steps_text(steps), f"{_mean([_drift(r) for r in runs]):.2f}"]
        for (label, runs), steps in zip(named.items(), (steps_bn, steps_none), strict=True)
    ]
    faster = all(s is not None for s in steps_bn) and _mean(steps_bn) <= 0.5 * _mean(steps_none)
    better = _mean(_final(with_bn)) > target + _spread(_final(without))
    slower = any(s is None for s in steps_bn) or _mean(steps_bn) >= _mean(steps_none)
    drift_bn, drift_none = _mean([_drift(r) for r in with_bn]), _mean([_drift(r) for r in without])
    claims = [
        Claim(
            "Batch norm trains faster: higher test accuracy after fewer steps (Figure 1a).",
            f"steps to the lowest final accuracy of the network without batch norm over seeds ({target:.3f}): "
            f"{_steps_text(steps_bn)} with, {_steps_text(steps_none)} without; "
            f"final accuracy {_pm(_final(with_bn))} with, {_pm(_final(without))} without",
            _verdict(faster and better, slower),
            "holds if the network with batch norm reaches that accuracy in at most half the steps and ends "
            "above it by more than the seeds' spread; does not hold if it needs as many steps or never gets there",
        ),
        Claim(
            "With batch norm the distribution of a sigmoid's input stays stable during training (Figure 1b, c).",
            f"travel of the 15th/50th/85th percentiles over training, in units of their spread: "
            f"{drift_bn:.2f} with, {drift_none:.2f} without",
            _verdict(drift_bn < 0.5 * drift_none, drift_bn >= drift_none),
            "holds if the travel with batch norm is less than half of that without; does not hold if it is not smaller",
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
    columns = ["network", "final test accuracy", "best test accuracy", "steps to reach target", "percentile travel"]
    return Result("fig1", "Figure 1: training speed and the sigmoid's input", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


# ------------------------------------------------------ 2. learning rates


def learning_rates(lab: Lab) -> Result:
    multipliers = (1, 5, 30)
    lab.prefetch(*({"norm": norm, "lr": BASE_LR * k} for norm in ("none", "bn") for k in multipliers))
    named = {}
    for norm, label in (("none", "baseline"), ("bn", "BN")):
        for k in multipliers:
            name = label if k == 1 else f"{label}-x{k}"
            named[name] = lab.runs(norm=norm, lr=BASE_LR * k)
    target = min(_best(named["baseline"]))  # every baseline seed reaches it
    rows = []
    steps = {}
    for name, runs in named.items():
        steps[name] = [_steps_to(run, target) for run in runs]
        rows.append([name, f"{runs[0].config.lr:g}", _steps_text(steps[name]), _pm(_best(runs))])
    reaches = {name: all(s is not None for s in steps[name]) for name in named}
    bn_high = reaches["BN-x5"] and reaches["BN-x30"]
    plain_fails = _mean(_best(named["baseline-x30"])) < target
    speedup = _mean(steps["baseline"]) / _mean([s for s in steps["BN-x5"] if s] or [float("inf")])
    claims = [
        Claim(
            "Batch norm allows much higher learning rates (the paper's BN-x5 and BN-x30).",
            f"best accuracy of the baseline {_pm(_best(named['baseline']))}; BN-x5 {_pm(_best(named['BN-x5']))}, "
            f"BN-x30 {_pm(_best(named['BN-x30']))}; without batch norm at x30 {_pm(_best(named['baseline-x30']))}",
            _verdict(bn_high and plain_fails, not reaches["BN-x30"]),
            "holds if BN-x5 and BN-x30 reach the baseline's best accuracy (its lowest over seeds) in every seed "
            "while the network without batch norm at x30 stays below it; does not hold if BN-x30 does not reach it",
        ),
        Claim(
            "With a 5x learning rate, batch norm reaches the baseline's accuracy in far fewer steps "
            "(14x fewer on ImageNet).",
            f"steps to {target:.3f}: baseline {_steps_text(steps['baseline'])}, BN-x5 {_steps_text(steps['BN-x5'])} "
            f"({speedup:.1f}x fewer)",
            _verdict(reaches["BN-x5"] and speedup >= 2, not reaches["BN-x5"] or speedup <= 1),
            "holds if BN-x5 needs at most half the baseline's steps; "
            "does not hold if it needs as many or never gets there",
        ),
    ]
    figures = {
        "Test accuracy at 1x, 5x and 30x the base learning rate": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", f"Learning rates (base {BASE_LR:g})"
        )
    }
    columns = ["model", "learning rate", f"steps to {target:.3f}", "best test accuracy"]
    return Result("learning-rates", "Higher learning rates (the paper's Figure 3)", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


# ---------------------------------------------------------------- 3. sigmoid


def sigmoid(lab: Lab) -> Result:
    depth = lab.scale.sigmoid_depth
    lab.prefetch(*({"norm": n, "activation": a, "depth": depth} for a in ("sigmoid", "relu") for n in ("bn", "none")))
    named = {
        f"{act}, {'with' if norm == 'bn' else 'without'} BN": lab.runs(norm=norm, activation=act, depth=depth)
        for act in ("sigmoid", "relu")
        for norm in ("bn", "none")
    }
    chance = _chance(lab)
    plain_sigmoid = _mean(_best(named["sigmoid, without BN"]))
    bn_sigmoid = _mean(_best(named["sigmoid, with BN"]))
    relu = _mean(_best(named["relu, without BN"]))
    rows = [[label, _pm(_best(runs)), _pm(_final(runs))] for label, runs in named.items()]
    claims = [
        Claim(
            "Batch norm makes sigmoid networks trainable (a sigmoid Inception without it never exceeded 0.1%).",
            f"{depth} hidden sigmoid layers: best accuracy {plain_sigmoid:.3f} without batch norm, "
            f"{bn_sigmoid:.3f} with (chance {chance:.3f}; ReLU without batch norm {relu:.3f})",
            _verdict(
                plain_sigmoid <= chance + 0.05 and bn_sigmoid >= 0.8 * relu,
                plain_sigmoid > chance + 0.2 or bn_sigmoid <= chance + 0.05,
            ),
            "holds if the sigmoid network without batch norm stays within 0.05 of chance and with it reaches 80% of "
            "the ReLU network's accuracy; does not hold if the sigmoid network trains without it (0.2 above chance) "
            "or not with it",
        )
    ]
    figures = {
        f"Test accuracy, {depth} hidden layers": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", f"Sigmoid and ReLU, {depth} x 100"
        )
    }
    columns = ["network", "best test accuracy", "final test accuracy"]
    return Result("sigmoid", "Sigmoid networks", columns, rows, claims, figures, _metrics(named))


# --------------------------------------------------------- 4. regularization

DROPOUT = 0.3


def regularization(lab: Lab) -> Result:
    lab.prefetch(
        {"norm": "none"}, {"norm": "none", "dropout": DROPOUT}, {"norm": "bn"}, {"norm": "bn", "dropout": DROPOUT}
    )
    named = {
        "neither": lab.runs(norm="none"),
        f"dropout {DROPOUT}": lab.runs(norm="none", dropout=DROPOUT),
        "batch norm": lab.runs(norm="bn"),
        "both": lab.runs(norm="bn", dropout=DROPOUT),
    }
    gaps = {
        label: [r.final["train_accuracy"] - r.final["test_accuracy"] for r in runs] for label, runs in named.items()
    }
    tests = {label: _final(runs) for label, runs in named.items()}
    rows = [[label, _pm(tests[label]), _pm(_final(runs, "train_accuracy")), _pm(gaps[label])]
            for label, runs in named.items()]  # fmt: skip
    noise = max(_spread(gaps["neither"]), _spread(gaps["batch norm"]), 0.005)
    dropout_label = f"dropout {DROPOUT}"
    margin = max(_spread(tests["batch norm"]), _spread(tests[dropout_label]), 0.005)
    difference = _mean(tests["batch norm"]) - _mean(tests[dropout_label])
    claims = [
        Claim(
            "Batch norm regularizes: a smaller gap between training and test accuracy.",
            f"train - test accuracy: {_pm(gaps['batch norm'])} with batch norm, {_pm(gaps['neither'])} with neither",
            _verdict(
                _mean(gaps["batch norm"]) < _mean(gaps["neither"]) - noise,
                _mean(gaps["batch norm"]) >= _mean(gaps["neither"]),
            ),
            "holds if the gap with batch norm is smaller than with neither by more than the seeds' spread "
            "(at least 0.005); does not hold if it is not smaller",
        ),
        Claim(
            "Batch norm can replace dropout.",
            f"test accuracy {_pm(tests['batch norm'])} with batch norm alone, {_pm(tests[dropout_label])} "
            f"with dropout alone, {_pm(tests['both'])} with both",
            _verdict(difference >= -margin, difference < -2 * margin),
            "holds if batch norm alone is within the seeds' spread of dropout alone or better; does not hold if it "
            "is worse by more than twice the spread",
        ),
    ]
    figures = {
        "Final test accuracy and train - test gap": plots.bars(
            {"test accuracy": tests, "train - test gap": gaps}, "accuracy", "Regularization"
        )
    }
    columns = ["regularization", "test accuracy", "train accuracy", "train - test gap"]
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


def _recovery_verdict(lost: float, recovered: float) -> str:
    """The rule of both renorm claims: what batch norm loses, and how much of it renorm wins back."""
    return _verdict(lost > 0.02 and recovered >= 0.5 * lost, lost > 0.02 and recovered <= 0.0)


def _recovery_rule(where: str) -> str:
    return (
        f"holds if batch norm loses more than 0.02 {where} and renorm wins back at least half of it; does not hold "
        "if it loses more than 0.02 and renorm wins none back; inconclusive otherwise (nothing to recover, or less "
        "than half)"
    )


def _renorm_claim(per_size: dict, sizes, reference: int) -> Claim:
    """Batch renorm at the small batches (at most 8) against batch norm there and at ``reference``."""
    small = [s for s in sizes if s <= 8] or [sizes[0]]
    bn_small = _mean([a for s in small for a in per_size[s][0]])
    renorm_small = _mean([a for s in small for a in per_size[s][3]])
    bn_reference = _mean(per_size[reference][0])
    lost = bn_reference - bn_small
    recovered = renorm_small - bn_small
    batches = ", ".join(str(s) for s in small)
    return Claim(
        "Batch renormalization recovers most of batch norm's accuracy at small batches (Ioffe 2017).",
        f"test accuracy at batches {batches}: batch norm {bn_small:.3f}, batch renorm {renorm_small:.3f}; batch "
        f"norm at batch {reference}: {bn_reference:.3f} (lost at small batches {lost:+.3f}, recovered by renorm "
        f"{recovered:+.3f})",
        _recovery_verdict(lost, recovered),
        _recovery_rule("at the small batches"),
    )


# Ioffe 2017, section 4.3: batch norm with non-i.i.d. batches (there 32 examples of 16 labels,
# 2 each, on ImageNet's 1000 labels). MNIST-1D has 10 labels, so that a batch of 32 drawn at
# random already holds about 3 of each; here a batch holds NONIID_LABELS labels, 8 examples each.
NONIID_BATCH, NONIID_LABELS = 32, 4


def _noniid_claim(iid: list[float], noniid: list[float], renormed: list[float]) -> Claim:
    """Batch renorm with non-i.i.d. batches against batch norm with them and with i.i.d. ones."""
    bn_iid, bn_noniid, renorm_noniid = _mean(iid), _mean(noniid), _mean(renormed)
    lost, recovered = bn_iid - bn_noniid, renorm_noniid - bn_noniid
    per_label = NONIID_BATCH // NONIID_LABELS
    return Claim(
        "With non-i.i.d. batches batch norm loses accuracy and batch renorm recovers most of it (Ioffe 2017).",
        f"test accuracy at batch {NONIID_BATCH}: batch norm {bn_iid:.3f} with i.i.d. batches, {bn_noniid:.3f} with "
        f"batches of {NONIID_LABELS} labels ({per_label} examples each; lost {lost:+.3f}); batch renorm with them "
        f"{renorm_noniid:.3f} (recovered {recovered:+.3f})",
        _recovery_verdict(lost, recovered),
        _recovery_rule("with the non-i.i.d. batches"),
    )


def batch_size(lab: Lab) -> Result:
    """The same number of examples seen and the same learning rate at every batch size,
    with and without batch norm: batch norm's effect is the difference between the two; and
    batch renorm (Ioffe 2017), which the paper says recovers most of it at small batches."""
    sizes = lab.scale.batch_sizes
    lines: dict[str, list[list[float]]] = {
        "with batch norm, eval mode (running statistics)": [],
        "with batch norm, train mode (batch statistics)": [],
        "without batch norm": [],
        "with batch renorm, eval mode": [],
    }
    rows, per_size, metrics = [], {}, {}

    def common(size: int) -> dict:
        steps = max(lab.scale.batch_examples // size, 1)
        return dict(batch_size=size, steps=steps, eval_every=max(steps // 5, 1))

    noniid = {"batch_size": NONIID_BATCH, "same_label": NONIID_BATCH // NONIID_LABELS}
    lab.prefetch(
        *({"norm": norm, **common(size)} for size in sizes for norm in ("bn", "none", "renorm")),
        {"norm": "bn", "batch_size": NONIID_BATCH}, {"norm": "bn", **noniid}, {"norm": "renorm", **noniid},
    )  # fmt: skip
    for size in sizes:
        steps = common(size)["steps"]
        with_bn, without = lab.runs(norm="bn", **common(size)), lab.runs(norm="none", **common(size))
        renormed = lab.runs(norm="renorm", **common(size))
        accuracy = _final(with_bn)
        batch_mode = [train_mode_accuracy(r.model, lab.dataset.x_test, lab.dataset.y_test, size) for r in with_bn]
        plain = _final(without)
        effect = [a - b for a, b in zip(accuracy, plain, strict=True)]
        renorm_accuracy = _final(renormed)
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
            _verdict(
                ref_effect > 0.05 and small_effect <= 0.02,
                ref_effect <= 0.05 or small_effect >= 0.5 * ref_effect,
            ),
            f"holds if batch norm helps at batch {reference} (by more than 0.05) but not at batch {smallest} "
            f"(at most 0.02); does not hold if it does not help at batch {reference} or keeps half its benefit "
            f"at batch {smallest}",
        ),
        _renorm_claim(per_size, sizes, reference),
    ]
    iid_runs = lab.runs(norm="bn", batch_size=NONIID_BATCH)
    noniid_runs, renorm_runs = lab.runs(norm="bn", **noniid), lab.runs(norm="renorm", **noniid)
    claims.append(_noniid_claim(_final(iid_runs), _final(noniid_runs), _final(renorm_runs)))
    metrics[f"batch {NONIID_BATCH}, i.i.d., with batch norm"] = [r.metrics for r in iid_runs]
    metrics[f"batch {NONIID_BATCH}, {NONIID_LABELS} labels, with batch norm"] = [r.metrics for r in noniid_runs]
    metrics[f"batch {NONIID_BATCH}, {NONIID_LABELS} labels, with batch renorm"] = [r.metrics for r in renorm_runs]
    figures = {
        f"Test accuracy against batch size: {lab.scale.batch_examples} examples seen, learning rate {BASE_LR:g}": (
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
    lab.prefetch({"norm": "bn"}, {"norm": "bn", "placement": "after"})
    named = {"before the activation": lab.runs(norm="bn"), "after": lab.runs(norm="bn", placement="after")}
    before, after = _best(named["before the activation"]), _best(named["after"])
    difference = abs(_mean(before) - _mean(after))
    noise = 2 * max(_spread(before), _spread(after))
    rows = [[label, _pm(_best(runs)), _pm(_final(runs))] for label, runs in named.items()]
    claims = [
        Claim(
            "Batch norm before or after the activation makes little difference.",
            f"best test accuracy {_pm(before)} before, {_pm(after)} after (difference {difference:.3f})",
            _verdict(difference <= max(0.02, noise), difference > 0.05 and difference > noise),
            "holds if the difference is at most 0.02 or twice the seeds' spread; does not hold if it exceeds "
            "both 0.05 and twice the spread",
        )
    ]
    figures = {
        "Test accuracy, batch norm before and after the sigmoid": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", "Placement"
        )
    }
    columns = ["batch norm", "best test accuracy", "final test accuracy"]
    return Result("placement", "Before or after the activation", columns, rows, claims, figures, _metrics(named))


# ----------------------------------------------------- 7. inference statistics


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

    lab.prefetch(*({"norm": "bn", "bn_momentum": momentum} for momentum in (0.1, 0.01, None)))
    runs = {momentum: lab.runs(norm="bn", bn_momentum=momentum) for momentum in (0.1, 0.01, None)}
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
    claims = [
        Claim(
            "At inference, running averages or statistics of the training set replace batch statistics; "
            "batch statistics of small batches fail.",
            f"test accuracy: running average {running:.3f}, population {population_mean:.3f}, whole test set as "
            f"one batch {whole:.3f}, batch of 1 {single:.3f}, batch of 2 "
            f"{_mean(methods['batch statistics, batch of 2']):.3f} (chance {chance:.3f})",
            _verdict(
                abs(running - whole) <= 0.02 and abs(population_mean - whole) <= 0.02 and single <= chance + 0.1,
                running < whole - 0.05
                or population_mean < whole - 0.05
                or single >= min(running, population_mean) - 0.05,
            ),
            "holds if the running average and the population statistics are within 0.02 of the whole-test-set batch "
            "statistics and a batch of 1 is within 0.1 of chance; does not hold if either is 0.05 worse than the "
            "whole-set batch or a batch of 1 comes within 0.05 of them",
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
}
