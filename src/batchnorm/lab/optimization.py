"""Why batch norm helps: Santurkar, Tsipras, Ilyas and Madry, "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018), and other normalizations across batch sizes (Wu & He 2018).

Santurkar et al. trained a VGG on CIFAR-10; out of reach here, their experiments run on the
lab's deep MLP: DEEP_DEPTH hidden layers of 100 ReLU units (VGG's activation), SGD with
momentum at the lab's learning rate, on MNIST-1D, every configuration with ``measure`` so that
each evaluation also records their measures (landscape.py) on the batch of the next step.
Every claim is decided by a rule of verdicts.py on an interval over paired seeds; measures
that differ by orders of magnitude (the landscape's, the shift's) are compared as the ratio
with / without batch norm, its interval made on the log scale.
"""

from __future__ import annotations

import math

from . import plots
from .claims import Claim, Result, _chosen, _mean, _metrics, _movement, _pm, _ratio, _settings, _tuned
from .verdicts import FAILS, UNSURE, above, below, every, paired, ratio, rule

__all__ = ["ics", "landscape", "lp_norms", "noisy_bn", "normalizations"]

DEEP_DEPTH = 6
DEEP = {"activation": "relu", "depth": DEEP_DEPTH, "measure": True}
MARGIN = 0.02  # test accuracy: "about as well" means at most this much worse
SHIFT_MARGIN = 0.8  # "does not reduce" the shift: by at most a fifth


def _over_training(run, key: str) -> float:
    """The mean of ``key`` over a run's evaluations (the same quantity for any number of them)."""
    return _mean([record[key] for record in run.metrics])


def _log_ratio(runs_a, runs_b, key: str):
    """The interval of log(a / b) over paired seeds, of ``key`` averaged over training."""
    return ratio([_over_training(run, key) for run in runs_a], [_over_training(run, key) for run in runs_b])


def _column(runs, key: str, digits: int = 3) -> str:
    return _pm([_over_training(run, key) for run in runs], digits)


def _deep(lab, norm: str) -> list:
    return lab.runs(norm=norm, **DEEP)


def _santurkar_runs(lab, *norms: str) -> dict[str, list]:
    """At the lab's one learning rate: the landscape's measures are taken at multiples of it."""
    lab.prefetch(*({"norm": norm, **DEEP} for norm in norms))
    return {norm: _deep(lab, norm) for norm in norms}


def _tuned_runs(lab, *norms: str) -> dict[str, list]:
    """Each at its tuned learning rate (Lab.tune), for claims that compare accuracies."""
    tuned = lab.tune(*({"norm": norm, **DEEP} for norm in norms))
    return {norm: lab.runs(**changes) for norm, changes in zip(norms, tuned, strict=True)}


_MEASURES = {
    "loss_range": "loss range along the gradient",
    "gradient_change": "l2 change of the gradient",
    "beta_smoothness": "effective beta-smoothness",
}


def landscape(lab) -> Result:
    runs = _santurkar_runs(lab, "bn", "none")
    named = {"with batch norm": runs["bn"], "without": runs["none"]}
    seeds = len(lab.seeds)
    intervals = {key: _log_ratio(runs["bn"], runs["none"], key) for key in _MEASURES}
    rows = [
        [label, _pm(_chosen(r))] + [_column(r, key) for key in _MEASURES] for label, r in named.items()
    ]  # fmt: skip
    path = "along -g at 1/2 to 4 times the learning rate, averaged over training"
    claims = [
        Claim(
            "Batch norm makes the loss landscape smoother: the loss varies less along the gradient "
            "(Santurkar et al. 2018, Figure 4a).",
            f"range of the loss {path}: {_column(runs['bn'], 'loss_range')} with, "
            f"{_column(runs['none'], 'loss_range')} without batch norm",
            below(intervals["loss_range"], 0.0),
            f"holds if the ratio with / without lies below 1 ({rule(seeds)}, on the log scale); does not hold if "
            "it lies at or above 1; inconclusive otherwise",
            f"loss range ratio {_ratio(intervals['loss_range'])}",
        ),
        Claim(
            "With batch norm the gradients are more predictive: they change less along the gradient direction "
            "and the effective beta-smoothness is lower (Figure 4b, c).",
            f"{path}: l2 change of the gradient {_column(runs['bn'], 'gradient_change')} with, "
            f"{_column(runs['none'], 'gradient_change')} without; beta-smoothness "
            f"{_column(runs['bn'], 'beta_smoothness')} with, {_column(runs['none'], 'beta_smoothness')} without",
            every(below(intervals["gradient_change"], 0.0), below(intervals["beta_smoothness"], 0.0)),
            f"holds if both ratios with / without lie below 1 ({rule(seeds)}, on the log scale); does not hold if "
            "either lies at or above 1; inconclusive otherwise",
            f"gradient change ratio {_ratio(intervals['gradient_change'])}, beta-smoothness ratio "
            f"{_ratio(intervals['beta_smoothness'])}",
        ),
    ]
    figures = {
        f"Santurkar et al.'s landscape measures during training, {DEEP_DEPTH} x 100 ReLU MLP (log scale)": (
            plots.panels(_metrics(named), _MEASURES, "The loss landscape", log=True)
        )
    }
    columns = ["network", "test accuracy"] + list(_MEASURES.values())
    return Result("landscape", "The loss landscape (Santurkar et al. 2018)", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


def ics(lab) -> Result:
    runs = _santurkar_runs(lab, "bn", "none")
    named = {"with batch norm": runs["bn"], "without": runs["none"]}
    relative = _log_ratio(runs["bn"], runs["none"], "ics_relative")
    keys = {"ics_relative": "||G - G'|| / ||G||", "ics_distance": "||G - G'||", "ics_cosine": "cos(G, G')"}
    rows = [[label] + [_column(r, key, 4) for key in keys] for label, r in named.items()]
    claims = [
        Claim(
            "Batch norm does not reduce internal covariate shift, measured as the change of a layer's gradient "
            "when the layers below it take their step; it may even increase it (Santurkar et al., Figure 5).",
            f"||G - G'|| / ||G|| averaged over layers and training: {_column(runs['bn'], 'ics_relative', 4)} with, "
            f"{_column(runs['none'], 'ics_relative', 4)} without batch norm; cos(G, G') "
            f"{_column(runs['bn'], 'ics_cosine', 4)} with, {_column(runs['none'], 'ics_cosine', 4)} without",
            above(relative, math.log(SHIFT_MARGIN)),
            f"holds if the ratio with / without of ||G - G'|| / ||G|| lies above {SHIFT_MARGIN} (batch norm "
            f"reduces the shift by less than a fifth, or increases it; {rule(len(lab.seeds))}, on the log scale); "
            f"does not hold if it lies at or below {SHIFT_MARGIN}; inconclusive otherwise",
            f"shift ratio {_ratio(relative)}",
        )
    ]
    figures = {
        "Internal covariate shift during training (Santurkar et al.'s Definition 2.1)": plots.panels(
            _metrics(named), {"ics_relative": "||G - G'|| / ||G||", "ics_cosine": "cos(G, G')"}, "ICS"
        )
    }
    columns = ["network"] + list(keys.values())
    return Result("ics", "Internal covariate shift (Santurkar et al. 2018)", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


def _instability(run) -> float:
    """How far the training-mode batch mean of the probed input moves over training, in units of
    the average batch standard deviation (claims._movement)."""
    means = [record["probe_batch_mean"] for record in run.metrics]
    return _movement(means, _mean([record["probe_batch_std"] for record in run.metrics]))


def noisy_bn(lab) -> Result:
    runs = _tuned_runs(lab, "bn", "bn-noisy", "none")
    named = {"batch norm": runs["bn"], "noisy batch norm": runs["bn-noisy"], "without": runs["none"]}
    unstable = {label: [_instability(run) for run in r] for label, r in named.items()}
    premise = ratio(unstable["noisy batch norm"], unstable["batch norm"])
    versus_bn = paired(_chosen(runs["bn-noisy"]), _chosen(runs["bn"]))
    versus_none = paired(_chosen(runs["bn-noisy"]), _chosen(runs["none"]))
    shown = above(premise, 0.0)
    verdict = every(UNSURE if shown == FAILS else shown, above(versus_bn, -MARGIN), above(versus_none, 0.0))
    rows = [[label, _settings(r), _pm(_chosen(r)), _pm(unstable[label])] for label, r in named.items()]
    claims = [
        Claim(
            "Batch norm followed by time-varying noise of non-zero mean and non-unit variance trains about as "
            "well as batch norm, and better than no batch norm, though the distribution its activations see "
            "moves from step to step (Santurkar et al., section 2.1, Figure 2).",
            f"test accuracy {_pm(_chosen(runs['bn-noisy']))} noisy, {_pm(_chosen(runs['bn']))} batch norm, "
            f"{_pm(_chosen(runs['none']))} without; movement of the probed input's training-mode batch mean "
            f"{_pm(unstable['noisy batch norm'])} noisy, {_pm(unstable['batch norm'])} batch norm",
            verdict,
            f"holds if the noisy network's movement is larger than batch norm's (ratio above 1: the premise), its "
            f"accuracy minus batch norm's lies above -{MARGIN} and minus the network without lies above 0 "
            f"({rule(len(lab.seeds))}, paired; {_tuned()}); does not hold if either accuracy interval lies at or "
            "below its bound; inconclusive otherwise, or if the premise is not shown",
            f"movement ratio {_ratio(premise)}; accuracy noisy - batch norm {versus_bn.text(signed=True)}, "
            f"noisy - without {versus_none.text(signed=True)}",
        )
    ]
    figures = {
        "Training-mode batch mean of one ReLU's input (unit 0 of the last hidden layer)": plots.curves(
            _metrics(named), "probe_batch_mean", "batch mean", "Noisy batch norm"
        ),
        "Test accuracy during training": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", "Noisy batch norm"
        ),
    }
    columns = ["network", "tuned learning rate", "test accuracy", "movement of the batch mean"]
    return Result("noisy-bn", "Noisy batch norm (Santurkar et al. 2018)", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


LP_LABELS = {"bn": "l2 (batch norm)", "bn-l1": "l1", "bn-linf": "l-infinity"}


def lp_norms(lab) -> Result:
    runs = _tuned_runs(lab, *LP_LABELS)
    named = {LP_LABELS[norm]: r for norm, r in runs.items()}
    differences = {norm: paired(_chosen(runs[norm]), _chosen(runs["bn"])) for norm in ("bn-l1", "bn-linf")}
    rows = [[label, _settings(r), _pm(_chosen(r)), _pm(_chosen(r, "val_accuracy"))] for label, r in named.items()]
    claims = [
        Claim(
            "Batch norm with the l1 or the l-infinity norm of the centred activations in place of the "
            "standard deviation trains as well as standard batch norm or better (Santurkar et al., section 3.3).",
            f"test accuracy: {', '.join(f'{LP_LABELS[n]} {_pm(_chosen(r))}' for n, r in runs.items())}",
            every(*(above(iv, -MARGIN) for iv in differences.values())),
            f"holds if each of l1 - l2 and l-infinity - l2 lies above -{MARGIN} ({rule(len(lab.seeds))}, paired; "
            f"{_tuned()}); does not hold if either lies at or below -{MARGIN}; inconclusive otherwise",
            ", ".join(f"{LP_LABELS[n]} - l2 {iv.text(signed=True)}" for n, iv in differences.items()),
        )
    ]
    figures = {
        f"Test accuracy, lp batch norm, {DEEP_DEPTH} x 100 ReLU MLP": plots.curves(
            _metrics(named), "test_accuracy", "test accuracy", "lp batch norm"
        )
    }
    columns = ["batch norm", "tuned learning rate", "test accuracy", "validation accuracy"]
    return Result("lp-norms", "lp batch norm (Santurkar et al. 2018)", columns, rows, claims, figures,
                  _metrics(named))  # fmt: skip


NORMALIZATIONS = {"bn": "batch norm", "gn": "group norm", "ln": "layer norm", "renorm": "batch renorm"}


def same_examples(lab, size: int) -> dict:
    """Wu & He's protocol: the same number of examples (epochs) seen at every batch size, the
    scale's ``examples``, so that a batch of 2 takes many more steps than one of 64."""
    steps = max(lab.scale.examples // size, 1)
    return {"batch_size": size, "steps": steps, "eval_every": max(steps // 5, 1)}


def normalizations(lab) -> Result:
    sizes = lab.scale.normalization_sizes
    lab.prefetch(*({"norm": norm, **same_examples(lab, size)} for size in sizes for norm in NORMALIZATIONS))
    runs = {(norm, size): lab.runs(norm=norm, **same_examples(lab, size)) for size in sizes for norm in NORMALIZATIONS}
    accuracy = {key: _chosen(r) for key, r in runs.items()}
    smallest, reference = sizes[0], max(s for s in sizes if s <= 64)
    bn_loses = paired(accuracy["bn", reference], accuracy["bn", smallest])
    gn_keeps = paired(accuracy["gn", smallest], accuracy["gn", reference])
    gn_over_bn = paired(accuracy["gn", smallest], accuracy["bn", smallest])
    rows = [[str(size)] + [_pm(accuracy[norm, size]) for norm in NORMALIZATIONS] for size in sizes]
    claims = [
        Claim(
            "Batch norm loses accuracy at small batches where group norm does not (Wu & He 2018).",
            f"test accuracy at batch {smallest} and {reference}: batch norm "
            f"{_mean(accuracy['bn', smallest]):.3f} and {_mean(accuracy['bn', reference]):.3f}, group norm "
            f"{_mean(accuracy['gn', smallest]):.3f} and {_mean(accuracy['gn', reference]):.3f}",
            every(above(bn_loses, 0.0), above(gn_keeps, -MARGIN)),
            f"holds if batch norm at batch {reference} minus at batch {smallest} lies above 0 and group norm at "
            f"batch {smallest} minus at {reference} lies above -{MARGIN} ({rule(len(lab.seeds))}, paired); does "
            "not hold if either lies at or below its bound; inconclusive otherwise",
            f"batch norm's loss {bn_loses.text(signed=True)}, group norm's change {gn_keeps.text(signed=True)}; "
            f"group norm - batch norm at batch {smallest} {gn_over_bn.text(signed=True)}",
        )
    ]
    lines = {
        label: [[accuracy[norm, size][i] for size in sizes] for i in range(len(lab.seeds))]
        for norm, label in NORMALIZATIONS.items()
    }
    figures = {
        f"Test accuracy against batch size, {lab.scale.examples} examples seen at every size (Wu & He)": (
            plots.versus(list(sizes), lines, "batch size", "test accuracy", "Normalizations")
        )
    }
    columns = ["batch"] + list(NORMALIZATIONS.values())
    metrics = {f"batch {size}, {NORMALIZATIONS[norm]}": [r.metrics for r in rs] for (norm, size), rs in runs.items()}
    return Result("normalizations", "Normalizations across batch sizes", columns, rows, claims, figures, metrics)
