"""The lab's figures, in one shared style, returned as PNG bytes.

Across seeds a line is the mean and the band the range (min to max).
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: the user's backend and figures stay untouched

STYLE = {
    "figure.figsize": (6.4, 3.8),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
}

__all__ = ["STYLE", "bars", "curves", "panels", "percentile_bands", "versus"]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _band(ax, x, runs, label, **style):
    values = np.asarray(runs, dtype=float)
    line = ax.plot(x, values.mean(0), label=label, **style)[0]
    if len(values) > 1:
        ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)


def curves(series: dict[str, list[list[dict]]], key: str, ylabel: str, title: str) -> bytes:
    """``key`` against step for each label; series[label] holds one metrics list per seed."""
    with matplotlib.rc_context(STYLE):
        figure = Figure()
        ax = figure.subplots()
        for label, runs in series.items():
            steps = [record["step"] for record in runs[0]]
            _band(ax, steps, [[record[key] for record in run] for run in runs], label)
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        ax.legend()
        return _png(figure)


def panels(series: dict[str, list[list[dict]]], keys: dict[str, str], title: str, log: bool = False) -> bytes:
    """One panel of curves per record key (keys[key] is its axis label), the labels in each."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.4 * len(keys), 3.4))
        axes = figure.subplots(1, len(keys), squeeze=False)[0]
        for ax, (key, ylabel) in zip(axes, keys.items(), strict=True):
            for label, runs in series.items():
                steps = [record["step"] for record in runs[0]]
                _band(ax, steps, [[record[key] for record in run] for run in runs], label)
            ax.set(xlabel="training step", ylabel=ylabel)
            if log:
                ax.set_yscale("log")
        axes[0].legend()
        figure.suptitle(title)
        return _png(figure)


def percentile_bands(series: dict[str, list[list[dict]]], title: str) -> bytes:
    """The 15th, 50th and 85th percentiles of the probed activation input, one panel per label."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(3.4 * len(series), 3.4))
        axes = figure.subplots(1, len(series), sharey=True, squeeze=False)
        for ax, (label, runs) in zip(axes[0], series.items(), strict=True):
            steps = [record["step"] for record in runs[0]]
            for key, style in (("probe_p85", ":"), ("probe_p50", "-"), ("probe_p15", ":")):
                _band(ax, steps, [[record[key] for record in run] for run in runs], key[-3:], linestyle=style)
            ax.set(xlabel="training step", title=label)
        axes[0][0].set_ylabel("input to the sigmoid")
        axes[0][0].legend()
        figure.suptitle(title)
        return _png(figure)


def bars(values: dict[str, dict[str, list[float]]], ylabel: str, title: str) -> bytes:
    """Grouped bars: values[group][label] holds one number per seed; bar = mean, whisker = range."""
    with matplotlib.rc_context(STYLE):
        figure = Figure()
        ax = figure.subplots()
        groups = list(values)
        labels = list(dict.fromkeys(label for group in values.values() for label in group))
        width = 0.8 / max(len(labels), 1)
        for i, label in enumerate(labels):
            means, low, high = [], [], []
            for group in groups:
                seeds = np.asarray(values[group].get(label, [np.nan]), dtype=float)
                means.append(seeds.mean())
                # clipped: with equal seeds, mean - min can come out as -1e-17
                low.append(max(seeds.mean() - seeds.min(), 0.0))
                high.append(max(seeds.max() - seeds.mean(), 0.0))
            x = np.arange(len(groups)) + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, means, width, yerr=[low, high], capsize=2, label=label)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=15)
        ax.set(ylabel=ylabel, title=title)
        if len(labels) > 1:
            ax.legend()
        return _png(figure)


def versus(x: list[float], series: dict[str, list[list[float]]], xlabel: str, ylabel: str, title: str) -> bytes:
    """Lines against a numeric x (log scale); series[label] holds one list over x per seed."""
    with matplotlib.rc_context(STYLE):
        figure = Figure()
        ax = figure.subplots()
        for label, runs in series.items():
            _band(ax, x, runs, label, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend()
        return _png(figure)
