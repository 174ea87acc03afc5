"""Population statistics (Algorithm 2): running statistics recomputed from a pass over data.

After training, the weights are fixed and every batch-norm layer's ``running_mean``
and ``running_var`` are replaced by statistics of its inputs over many training
batches, instead of the moving averages kept during training. Two estimators:

    paper  E[x]   = mean of the batch means,
           Var[x] = mean of the unbiased batch variances  var_b * m_b/(m_b - 1)
    exact  the mean and unbiased variance of all the values seen, merged batch by
           batch with Chan's formula in float64; independent of how the data is split

Each batch is weighted by its number of values per channel m_b. Works on this
project's layers and on torch's.

As in Algorithm 2, the data flows through the training network: layers after the
first see activations normalized with batch statistics, so their estimates depend
on the batch composition as training did; the first layer's "exact" estimate does not.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import synced
from .kernels.reference import batch_stats
from .layers import _BatchNorm
from .ops import NONFINITE_WARNING

Tensor = torch.Tensor

__all__ = ["ExactEstimator", "PaperEstimator", "population_statistics", "batch_norm_layers"]


class PaperEstimator:
    """E[x] = sum m_b mu_b / sum m_b;  Var[x] = sum m_b var_b m_b/(m_b-1) / sum m_b."""

    def __init__(self) -> None:
        self.count = 0
        self.weighted_mean: Tensor | float = 0.0
        self.weighted_var: Tensor | float = 0.0

    def update(self, mean: Tensor, var: Tensor, count: int) -> None:
        """One batch: its per-channel mean, biased variance and values per channel."""
        self.count += count
        self.weighted_mean = self.weighted_mean + count * mean
        self.weighted_var = self.weighted_var + count * var * (count / (count - 1))

    def result(self) -> tuple[Tensor, Tensor]:
        return self.weighted_mean / self.count, self.weighted_var / self.count


class ExactEstimator:
    """Mean and unbiased variance of every value seen (Chan, Golub & LeVeque's merge).

    With n values so far (mean M, sum of squared deviations S) and a batch of m
    (mean mu, biased var v): delta = mu - M, n' = n + m,
    M' = M + delta * m/n',  S' = S + m*v + delta^2 * n*m/n'.  Var = S/(n-1).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | float = 0.0
        self.sum_sq: Tensor | float = 0.0

    def update(self, mean: Tensor, var: Tensor, count: int) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.sum_sq = self.sum_sq + count * var + delta * delta * (self.count * count / total)
        self.count = total

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.sum_sq / (self.count - 1)


ESTIMATORS = {"paper": PaperEstimator, "exact": ExactEstimator}


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every batch-norm layer with running statistics, this project's and torch's."""
    kinds = (_BatchNorm, nn.modules.batchnorm._BatchNorm)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds) and module.track_running_stats
    ]


def _first_tensor(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def population_statistics(
    model: nn.Module,
    batches: Iterable,
    estimator: str = "exact",
    max_batches: int | None = None,
    progress: bool = False,
    forward: Callable[[nn.Module, object], object] | None = None,
    process_group=None,
) -> dict[str, int]:
    """Replace every batch-norm layer's running statistics by population statistics.

    The model runs in training mode (each layer normalizes with its batch
    statistics, as in training) over ``batches``, at most ``max_batches`` of them;
    each layer's inputs are reduced in float64 by the chosen estimator ("paper" or
    "exact", see the module docstring). Afterwards the running_mean and running_var
    of each layer that saw data hold the estimate; num_batches_tracked, momentum,
    the weights and every module's train/eval mode are as they were.

    A batch whose input to a layer has NaN or infinite values (its statistics not
    finite) is skipped by that layer: left out of its estimate, never merged, and
    counted; one RuntimeWarning at the end gives the counts by layer (the layers' own
    warning for each such batch is not repeated). A layer that kept no batch keeps its
    running statistics, with a warning.

    ``forward(model, batch)`` runs one batch; by default ``model(batch)``, or
    ``model(batch[0])`` for a tuple or list (inputs, targets).
    Under an initialized torch.distributed group of more than one process (``process_group``:
    None the default group, False none), each rank passes its own shard of the data and the
    estimates are merged over the group at the end (one all_gather a layer, float64, in rank
    order): every rank ends with the same statistics, those of one pass over all the shards.
    With SyncBatchNorm layers in the model every rank must pass the same number of batches
    (their forward synchronizes).

    Returns the number of values per channel each layer's estimate holds, by layer name.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got estimator={estimator!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive integer or None, got max_batches={max_batches!r}")
    layers = batch_norm_layers(model)
    run = forward or (lambda module, batch: module(_first_tensor(batch)))
    modes = {module: module.training for module in model.modules()}
    saved = {
        name: (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
        for name, layer in layers
    }
    estimates = {name: ESTIMATORS[estimator]() for name, _ in layers}
    skipped = dict.fromkeys(estimates, 0)

    def recorder(name: str):
        def hook(layer: nn.Module, args) -> None:
            input = args[0]
            axis = getattr(layer, "axis", 1) % input.dim()
            count = input.numel() // input.shape[axis]
            if count > 1:
                mean, var = batch_stats(input.detach(), axis)
                if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
                    skipped[name] += 1
                    return
                estimates[name].update(mean, var, count)

        return hook

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers]
    try:
        with warnings.catch_warnings():  # the skip is reported once, below
            warnings.filterwarnings("ignore", message=re.escape(NONFINITE_WARNING), category=RuntimeWarning)
            model.train()
            total = max_batches if max_batches is not None else _length(batches)
            batches = tqdm(batches, total=total, disable=not progress, desc="population statistics")
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for name, layer in layers:
            running_mean, running_var, num_batches_tracked = saved[name]
            layer.running_mean.copy_(running_mean)
            layer.running_var.copy_(running_var)
            layer.num_batches_tracked.copy_(num_batches_tracked)

    if any(skipped.values()):
        by_layer = ", ".join(f"{name!r}: {n}" for name, n in skipped.items() if n)
        warnings.warn(
            f"population_statistics: batches with NaN or infinite values were skipped, not merged "
            f"(by layer: {by_layer})",
            RuntimeWarning,
            stacklevel=3,  # past torch.no_grad's wrapper: the caller's line
        )
    if process_group is not False and synced.world(process_group) > 1:
        for name, layer in layers:
            _merge(estimates[name], layer.running_mean, process_group)
    counts = {}
    for name, layer in layers:
        counts[name] = estimates[name].count
        if estimates[name].count < 2:
            warnings.warn(
                f"population_statistics: layer {name!r} saw no batch; its running statistics are unchanged",
                stacklevel=3,  # past torch.no_grad's wrapper: the caller's line
            )
            continue
        mean, var = estimates[name].result()
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    return counts


def _merge(estimate, like: Tensor, group) -> None:
    """``estimate`` (PaperEstimator or ExactEstimator) merged in place with every rank's of
    the group; ``like`` gives the channels and the device."""
    C = like.shape[0]
    paper = isinstance(estimate, PaperEstimator)
    first, second = (estimate.weighted_mean, estimate.weighted_var) if paper else (estimate.mean, estimate.sum_sq)
    local = torch.zeros(3, C, dtype=torch.float64, device=like.device)
    local[0] = estimate.count
    local[1] += first if isinstance(first, Tensor) else torch.tensor(first, dtype=torch.float64)
    local[2] += second if isinstance(second, Tensor) else torch.tensor(second, dtype=torch.float64)
    gathered = [torch.empty_like(local) for _ in range(synced.world(group))]
    torch.distributed.all_gather(gathered, local, group=group)
    if paper:
        total = torch.stack(gathered).sum(0)
        estimate.count, estimate.weighted_mean, estimate.weighted_var = int(total[0, 0]), total[1], total[2]
        return
    merged = ExactEstimator()
    for part in gathered:  # Chan's merge of (n, mean, sum of squared deviations), rank by rank
        n = int(part[0, 0])
        if n:
            total = merged.count + n
            delta = part[1] - merged.mean
            merged.sum_sq = merged.sum_sq + part[2] + delta * delta * (merged.count * n / total)
            merged.mean = merged.mean + delta * (n / total)
            merged.count = total
    estimate.count, estimate.mean, estimate.sum_sq = merged.count, merged.mean, merged.sum_sq


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None
