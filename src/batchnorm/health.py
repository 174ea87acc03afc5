"""A batch-norm health report: ``batchnorm.inspect(model, batches)``.

For every batch-norm layer with running statistics (this project's and torch's), over the
batches given (inputs, or (inputs, targets) pairs), with the model's state left as it was:

- train/eval gap (Wu & Johnson 2021's train-test inconsistency): the layer's output with
  batch statistics against its output with the running statistics, on the same batches,
  as the mean |y_train - y_eval| over the standard deviation of y_eval;
- running against population statistics: the statistics of the layer's input over all the
  batches (in eval mode, Chan's merge in float64) against the running ones: the largest
  |running_mean - mean| / std over channels and the largest |log(running_var / var)|;
- channels with |gamma| below 1e-3 (a channel switched off) and channels whose population
  variance is below the layer's eps (collapsed: they normalize noise);
- the momentum and the mode: a layer in eval mode while the model is in training mode is
  a common mistake (it neither normalizes with the batch nor updates its statistics).

Each finding says what to do. ``inspect`` returns a ``Report`` (``layers``: one ``Health``
a layer) whose ``str`` is the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional as F
from .stats import ExactEstimator, batch_norm_layers

__all__ = ["Health", "Report", "inspect"]

# mean |train - eval| in units of the eval output's spread: batch statistics of m values are
# off the running ones by about 1/sqrt(m) of a standard deviation (0.1-0.2 at batch 64)
GAP_LIMIT = 0.5
DRIFT_LIMIT = 0.25  # running mean off by a quarter standard deviation, or var by 25% in log


@dataclass
class Health:
    name: str
    kind: str
    momentum: float | None
    training: bool
    train_eval_gap: float
    mean_drift: float
    var_drift: float
    dead_channels: int
    collapsed_channels: int
    findings: list[str] = field(default_factory=list)


@dataclass
class Report:
    layers: list[Health]

    def __str__(self) -> str:
        lines = [
            "| layer | kind | momentum | mode | train/eval gap | mean drift | var drift | |gamma|<1e-3 | collapsed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for h in self.layers:
            mode = "train" if h.training else "eval"
            lines.append(
                f"| {h.name} | {h.kind} | {h.momentum} | {mode} | {h.train_eval_gap:.3f} | {h.mean_drift:.3f} | "
                f"{h.var_drift:.3f} | {h.dead_channels} | {h.collapsed_channels} |"
            )
        findings = [f"- {h.name}: {finding}" for h in self.layers for finding in h.findings]
        return "\n".join(lines + ([""] + findings if findings else ["", "No findings."]))


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def inspect(model: nn.Module, batches, max_batches: int | None = None) -> Report:
    """The health report of ``model``'s batch-norm layers over ``batches`` (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = batch_norm_layers(model)
    modes = {m: m.training for m in model.modules()}
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    outputs: dict[str, dict[str, list[torch.Tensor]]] = {name: {"eval": [], "train": []} for name, _ in layers}
    population = {name: ExactEstimator() for name, _ in layers}
    phase = {"mode": "eval"}

    def hook(name):
        def record(module, args, output):
            outputs[name][phase["mode"]].append(output.detach())
            if phase["mode"] == "eval":
                axis = getattr(module, "axis", 1)  # this project's BatchNorm takes any channel axis
                mean, var = F.batch_statistics(args[0], axis)
                population[name].update(mean, var, args[0].numel() // args[0].shape[axis])

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                x = _inputs(batch)
                phase["mode"] = "eval"
                model.eval()
                model(x)
                phase["mode"] = "train"
                model.train()
                model(x)  # batch statistics
                model.load_state_dict(state)  # the running updates undone before the next eval pass
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.load_state_dict(state)
        for module, training in modes.items():
            module.training = training
    if not seen:
        raise ValueError("inspect needs at least one batch, got none")
    return Report([_health(name, module, outputs[name], population[name], model.training) for name, module in layers])


def _health(name, module, outputs, population, model_training) -> Health:
    train, evaluated = (
        torch.cat([t.double() for t in outputs["train"]]),
        torch.cat([t.double() for t in outputs["eval"]]),
    )
    gap = float((train - evaluated).abs().mean() / evaluated.std().clamp_min(1e-12))
    mean, var = population.mean, population.sum_sq / population.count
    running_mean, running_var = module.running_mean.double(), module.running_var.double()
    mean_drift = float(((running_mean - mean).abs() / torch.sqrt(var + module.eps)).max())
    var_drift = float(torch.log((running_var + module.eps) / (var + module.eps)).abs().max())
    dead = 0 if module.weight is None else int((module.weight.detach().abs() < 1e-3).sum())
    collapsed = int((var < module.eps).sum())
    findings = []
    if model_training and not module.training:
        findings.append(
            "in eval mode while the model trains: it uses and never updates its running statistics; call "
            "model.train() after any module.eval(), or freeze it on purpose (batchnorm.freeze)"
        )
    if gap > GAP_LIMIT:
        findings.append(
            f"train and eval outputs differ by {gap:.2f} of the output's spread: batches too small or not "
            "i.i.d. (use larger batches, batch renorm or ghost batch norm), or running statistics not settled"
        )
    if mean_drift > DRIFT_LIMIT or var_drift > DRIFT_LIMIT:
        findings.append(
            f"running statistics off the data's (mean by {mean_drift:.2f} std, var by a factor "
            f"{math.exp(var_drift):.2f}): recompute them with batchnorm.population_statistics before evaluating"
        )
    if dead:
        findings.append(
            f"{dead} channel(s) with |gamma| < 1e-3 are switched off: prune them, or check the weight decay"
        )
    if collapsed:
        findings.append(
            f"{collapsed} channel(s) with a variance below eps: they normalize noise; look at the layer before"
        )
    return Health(
        name, type(module).__name__, module.momentum, module.training, gap, mean_drift, var_drift, dead, collapsed,
        findings,
    )  # fmt: skip
