"""Training one configuration: deterministic, evaluated every k steps, resumable.

Batches: epoch e is a permutation of the training set drawn from a generator seeded
with (seed, e), so a run needs no sampler state to resume; with ``same_label`` k > 1 it is a
permutation of groups of k examples of one label each, so that every batch holds
batch_size / k such groups (Ioffe 2017's non-i.i.d. batches: 16 labels, 2 examples each); dropout draws from
torch's global generator, whose state goes into every checkpoint.

Every ``eval_every`` steps, in eval mode: test loss and accuracy on the whole test
set, accuracy on the first ``train_eval_size`` training examples, and the 15th,
50th and 85th percentiles over the test set of the input to one activation of the
last hidden layer (unit 0 of the last ``Probe``; the paper's Figure 1 b, c). With
``measure``, also Santurkar et al.'s measures (``landscape.measure``) and the training-mode
mean and standard deviation of that input, on the batch of the next step. With
``validation`` > 0 that fraction of the training set is held out (data.hold_out) and
evaluated too: ``Run.chosen`` is the evaluation of its best accuracy, so that nothing is
chosen on the test set.

Every ``checkpoint_every`` steps (a multiple of ``eval_every``) the model, the
optimizer, the random state and the metrics so far are written atomically to
``OUT/checkpoint.pt``; ``resume=True`` continues from it and ends with exactly the
numbers of an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoints, landscape, models
from . import data as data_module

__all__ = ["Config", "Run", "evaluate", "train"]

OPTIMIZERS = ("sgd", "adam", "rmsprop")


@dataclass(frozen=True)
class Config:
    data: str = "mnist1d"
    model: str = "mlp"  # mlp or cnn
    activation: str = "sigmoid"
    norm: str = "bn"  # bn, torch, renorm or none
    placement: str = "before"  # before or after the activation (MLP)
    dropout: float = 0.0
    depth: int = 3
    width: int = 100
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # SGD momentum
    batch_size: int = 60
    steps: int = 2000
    eval_every: int = 100
    checkpoint_every: int = 0  # 0: no checkpoints
    seed: int = 0
    bn_momentum: float | None = 0.1
    train_eval_size: int = 1000
    same_label: int = 1  # examples of one label drawn together (1: i.i.d. batches)
    measure: bool = False  # at every evaluation: landscape.measure and the probe's batch statistics
    validation: float = 0.0  # the fraction of the training set held out to choose the evaluation reported

    def __post_init__(self) -> None:
        positive = ("depth", "width", "batch_size", "steps", "eval_every", "train_eval_size", "same_label")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if not (isinstance(self.validation, (int, float)) and 0 <= self.validation < 1):
            raise ValueError(f"validation must be a fraction in [0, 1), got validation={self.validation!r}")
        if not isinstance(self.measure, bool):
            raise ValueError(f"measure must be True or False, got measure={self.measure!r}")
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got model={self.model!r}")
        if self.model == "cnn":
            mlp_only = {"depth": 3, "width": 100, "placement": "before", "dropout": 0.0}
            changed = [f"{k}={getattr(self, k)!r}" for k, v in mlp_only.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} applies to the MLP only: model='cnn' has two conv blocks of 32 and 64 "
                    "channels with batch norm before each activation and no dropout"
                )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got lr={self.lr!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be a number in [0, 1), got momentum={self.momentum!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got dropout={self.dropout!r}")
        if self.bn_momentum is not None and not (
            isinstance(self.bn_momentum, (int, float)) and 0 <= self.bn_momentum <= 1
        ):
            raise ValueError(f"bn_momentum must be in [0, 1] or None, got bn_momentum={self.bn_momentum!r}")
        if self.batch_size < 2 and self.norm != "none":
            raise ValueError(f"batch norm needs batch_size >= 2 in training, got batch_size={self.batch_size}")
        if self.batch_size % self.same_label:
            raise ValueError(
                f"batch_size must be a multiple of same_label={self.same_label}, got batch_size={self.batch_size}"
            )
        if self.checkpoint_every < 0 or self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every must be 0 or a multiple of eval_every={self.eval_every}, "
                f"got checkpoint_every={self.checkpoint_every}"
            )

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


@dataclass
class Run:
    config: Config
    model: nn.Module
    metrics: list[dict] = field(default_factory=list)  # one record per evaluation

    @property
    def final(self) -> dict:
        return self.metrics[-1]

    def best(self, key: str = "test_accuracy") -> float:
        return max(record[key] for record in self.metrics)

    @property
    def chosen(self) -> dict:
        """The evaluation of the highest validation accuracy (the first of equals); the last
        evaluation without a validation split."""
        if "val_accuracy" not in self.metrics[0]:
            return self.final
        return max(self.metrics, key=lambda record: record["val_accuracy"])


def build_model(config: Config, dataset: data_module.Dataset) -> nn.Module:
    if config.model == "mlp":
        return models.mlp(
            dataset.num_features,
            dataset.num_classes,
            depth=config.depth,
            width=config.width,
            activation=config.activation,
            norm=config.norm,
            placement=config.placement,
            dropout=config.dropout,
            bn_momentum=config.bn_momentum,
            steps=config.steps,
        )
    return models.cnn(
        dataset.example_shape,
        dataset.num_classes,
        activation=config.activation,
        norm=config.norm,
        bn_momentum=config.bn_momentum,
        steps=config.steps,
    )


def _optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.RMSprop(model.parameters(), lr=config.lr)


def _usable(config: Config, labels: torch.Tensor) -> torch.Tensor:
    """How many examples of each label make whole groups of ``same_label``."""
    return torch.bincount(labels) // config.same_label * config.same_label


def _epoch_order(config: Config, epoch: int, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    k = config.same_label
    if k == 1 or labels is None:
        return order
    # each label's examples in that random order, cut into groups of k (a label's last
    # incomplete group dropped), then the groups in a random order
    by_label = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[labels[by_label]]
    groups = by_label[rank < _usable(config, labels)[labels[by_label]]].view(-1, k)
    return groups[torch.randperm(len(groups), generator=generator)].flatten()


def batch_indices(config: Config, step: int, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The training examples of ``step`` (0-based); each epoch drops its last incomplete batch.
    With ``config.same_label`` > 1 the ``labels`` of the n examples make the groups."""
    usable = n if config.same_label == 1 or labels is None else int(_usable(config, labels).sum())
    per_epoch = max(usable // config.batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    start = position * config.batch_size
    return _epoch_order(config, epoch, n, labels)[start : start + config.batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in its current mode."""
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch):
        logits = model(x[start : start + batch])
        target = y[start : start + batch]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss / len(y), correct / len(y)


def _probe_values(model: nn.Module, x: torch.Tensor, unit: int) -> torch.Tensor | None:
    """Unit ``unit``'s inputs at the last Probe over ``x``, in the model's current mode (None without a Probe)."""
    probes = [m for m in model.modules() if isinstance(m, models.Probe)]
    if not probes:
        return None
    seen = []
    handle = probes[-1].register_forward_hook(lambda _m, _i, out: seen.append(out[:, unit].flatten()))
    try:
        model(x)
    finally:
        handle.remove()
    return torch.cat(seen).double()


@torch.no_grad()
def probe_percentiles(model: nn.Module, x: torch.Tensor, unit: int = 0) -> tuple[float, float, float]:
    """15th, 50th and 85th percentiles over ``x`` of unit ``unit`` at the last Probe (eval mode)."""
    values = _probe_values(model, x, unit)
    if values is None:
        return (float("nan"),) * 3
    q = torch.quantile(values, torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
    return tuple(float(v) for v in q)


def _measures(model: nn.Module, dataset: data_module.Dataset, config: Config, step: int) -> dict:
    """On the batch of the next step, in training mode: Santurkar et al.'s measures
    (landscape.measure at the learning rate) and the mean and standard deviation over the
    batch of the input to unit 0 of the last Probe, the distribution a training step sees.
    The model, its buffers and torch's random state are left as they were."""
    index = batch_indices(config, step, len(dataset.y_train), dataset.y_train)
    x, y = dataset.x_train[index], dataset.y_train[index]
    was_training = model.training
    model.train()
    try:
        numbers = landscape.measure(model, x, y, config.lr)
        with landscape.unchanged(model), torch.no_grad():
            values = _probe_values(model, x, 0)
    finally:
        model.train(was_training)
    missing = values is None
    numbers["probe_batch_mean"] = float("nan") if missing else float(values.mean())
    numbers["probe_batch_std"] = float("nan") if missing else float(values.std(correction=0))
    return numbers


def _record(
    model: nn.Module, dataset: data_module.Dataset, config: Config, step: int, train_loss: float, held=None
) -> dict:
    measured = _measures(model, dataset, config, step) if config.measure else {}
    was_training = model.training
    model.eval()
    test_loss, test_accuracy = evaluate(model, dataset.x_test, dataset.y_test)
    if held is not None:
        val_loss, val_accuracy = evaluate(model, *held)
        measured = {"val_loss": val_loss, "val_accuracy": val_accuracy, **measured}
    k = min(config.train_eval_size, len(dataset.y_train))
    _, train_accuracy = evaluate(model, dataset.x_train[:k], dataset.y_train[:k])
    p15, p50, p85 = probe_percentiles(model, dataset.x_test)
    model.train(was_training)
    return {
        "step": step,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_accuracy": train_accuracy,
        "probe_p15": p15,
        "probe_p50": p50,
        "probe_p85": p85,
        **measured,
    }


_CHECKPOINT_KEYS = {"config": dict, "step": int, "model": dict, "optimizer": dict, "rng": torch.Tensor, "metrics": list}


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialized torch.distributed group, (0, 1) without one."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return 0, 1
    return distributed.get_rank(), distributed.get_world_size()


def check_synchronizable(config: Config) -> None:
    """A ValueError for a norm without a synchronized form (convert_sync_batchnorm refuses it)."""
    if config.norm in ("renorm", "bn-l1", "bn-linf"):
        raise ValueError(f"training over several processes needs a synchronized norm: norm={config.norm!r} has none")


def _synchronized(model: nn.Module, config: Config) -> nn.Module:
    """``model`` with SyncBatchNorm for its batch norm (batchnorm.convert_sync_batchnorm), for
    training over the process group."""
    from ..sync_conversion import convert_sync_batchnorm

    check_synchronizable(config)
    return convert_sync_batchnorm(model)


def _resume(path: str, config: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer`` and torch's generator, after checking
    that it is one of this configuration; CheckpointError (the file named) otherwise."""
    state = checkpoints.load(path, _CHECKPOINT_KEYS)
    if state["config"] != dataclasses.asdict(config):
        differ = sorted(k for k in dataclasses.asdict(config) if state["config"].get(k) != getattr(config, k))
        shown = ", ".join(f"{k}={state['config'].get(k)!r} (now {getattr(config, k)!r})" for k in differ)
        raise checkpoints.CheckpointError(f"resume: {path} was written with another configuration: {shown}")
    if not 0 < state["step"] <= config.steps:
        raise checkpoints.CheckpointError(
            f"resume: {path} is at step {state['step']}, outside 1..{config.steps} (--steps)"
        )
    if len(state["metrics"]) != state["step"] // config.eval_every:
        raise checkpoints.CheckpointError(
            f"resume: {path} has {len(state['metrics'])} evaluations for step {state['step']}, "
            f"expected {state['step'] // config.eval_every}"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise checkpoints.CheckpointError(f"resume: {path} does not fit this configuration's model: {first}") from None
    return state


def write_metrics(run: Run, out: str) -> None:
    """metrics.json (configuration and records) and metrics.csv (the records) in ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump({"config": dataclasses.asdict(run.config), "metrics": run.metrics}, handle, indent=1)
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(run.metrics[0]) if run.metrics else ["step"])
        writer.writeheader()
        writer.writerows(run.metrics)


def train(
    config: Config,
    dataset: data_module.Dataset | None = None,
    out: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> Run:
    """Train one configuration; with ``out``, write metrics (and checkpoints when asked) there.

    ``progress``: a tqdm bar (default: when stderr is a terminal); ``log``: called with
    one plain line per evaluation.
    """
    dataset = dataset if dataset is not None else data_module.load(config.data)
    held = None
    if config.validation:
        dataset, x_val, y_val = data_module.hold_out(dataset, config.validation)
        held = (x_val, y_val)
    torch.manual_seed(config.seed)
    model = build_model(config, dataset)
    rank, world = _process_group()
    if world > 1:  # every rank built the same model from the seed; batch norm sees the global batch
        model = _synchronized(model, config)
    optimizer = _optimizer(config, model)
    run = Run(config, model)
    step = 0
    checkpoint = os.path.join(out, "checkpoint.pt") if out else None
    if resume:
        if checkpoint is None or not os.path.exists(checkpoint):
            raise FileNotFoundError(f"resume: no checkpoint at {checkpoint!r}")
        state = _resume(checkpoint, config, model, optimizer)
        run.metrics = state["metrics"]
        step = state["step"]
    if out:
        os.makedirs(out, exist_ok=True)

    n = len(dataset.y_train)
    loss_sum, loss_count = 0.0, 0
    step_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model)
        if rank != 0:  # rank 0 writes, logs and shows the bar
            out, checkpoint, log, progress = None, None, None, False
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=config.steps, initial=step, disable=not show, desc=f"{config.norm} {config.activation}")
    model.train()
    while step < config.steps:
        index = batch_indices(config, step, n, dataset.y_train)
        if world == 1:
            logits = model(dataset.x_train[index])
            loss = nn.functional.cross_entropy(logits, dataset.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:  # this rank's part of the global batch, and its share of the global mean loss
            total, index = len(index), index.tensor_split(world)[rank]
            logits = step_model(dataset.x_train[index])
            loss = nn.functional.cross_entropy(logits, dataset.y_train[index], reduction="sum") / total
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()  # DistributedDataParallel averages: world times each share sums them
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
        optimizer.step()
        loss_sum += loss.item()
        loss_count += 1
        step += 1
        bar.update(1)
        if step % config.eval_every == 0 or step == config.steps:
            record = _record(model, dataset, config, step, loss_sum / loss_count, held)
            run.metrics.append(record)
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(test_accuracy=f"{record['test_accuracy']:.3f}")
            if checkpoint and config.checkpoint_every and step % config.checkpoint_every == 0:
                state = {
                    "config": dataclasses.asdict(config),
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "metrics": run.metrics,
                }
                checkpoints.save_atomically(state, checkpoint)
            if log:
                log(
                    f"step {step}/{config.steps}: train loss {record['train_loss']:.4f}, "
                    f"test loss {record['test_loss']:.4f}, test accuracy {record['test_accuracy']:.4f}"
                )
    bar.close()
    if out:
        write_metrics(run, out)
    return run
