"""Running experiments and writing what they found: report.html, PNG figures, metrics.json.

report.html is self-contained (figures embedded as base64 PNG): the claims tables
with their verdicts and rules, each experiment's results table and figures, the
configuration, the versions and the git commit.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable

import matplotlib
import numba
import numpy as np
import torch

from . import data as data_module
from .experiments import EXPERIMENTS, SCALES, Lab, Result

__all__ = ["reproduce", "summary", "write"]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("batchnorm")
    except PackageNotFoundError:
        own = "not installed"
    return {
        "batchnorm": own,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
    }


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return result.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.holds { color: #176317; font-weight: bold; } .does-not-hold { color: #a11; font-weight: bold; }
.inconclusive { color: #8a6d00; font-weight: bold; }
figure { margin: 0.5rem 0 1.5rem; } figure img { max-width: 100%; } figcaption { font-size: 0.85rem; color: #555; }
.rule { font-size: 0.8rem; color: #555; }
"""


def _claims_html(result: Result) -> str:
    rows = []
    for claim in result.claims:
        verdict = f'<span class="{_slug(claim.verdict)}">{html.escape(claim.verdict)}</span>'
        rows.append(
            f"<tr><td>{html.escape(claim.claim)}</td><td>{html.escape(claim.measured)}</td><td>{verdict}</td>"
            f"<td>{html.escape(claim.interval)}</td><td class='rule'>{html.escape(claim.rule)}</td></tr>"
        )
    head = (
        "<tr><th>claim (the seeds)</th><th>measured</th><th>verdict</th><th>interval (mean [95% interval])</th>"
        "<th>rule</th></tr>"
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _tuning_cell(tuned: dict, point: str) -> str:
    if point not in tuned["validation"]:
        return ""
    text = f"{tuned['validation'][point]:.3f}"
    return f"{text} (chosen)" if point == tuned["chosen"] else text


def render(results: list[Result], settings: dict, seconds: float) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>batchnorm: what batch norm does</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Batch normalization: the claims, measured</h1>",
        f"<p>Scale <b>{html.escape(settings['scale'])}</b>, data <b>{html.escape(settings['data'])}</b>, "
        f"seeds {html.escape(str(settings['seeds']))}; {seconds:.0f} s. Command: <code>"
        f"{html.escape(settings['command'])}</code></p>",
        "<h2>Summary</h2>",
        _table(
            ["experiment", "claim", "verdict", "interval"],
            [[r.name, c.claim, c.verdict, c.interval] for r in results for c in r.claims],
        ),
    ]
    for result in results:
        parts.append(f"<h2 id='{result.name}'>{html.escape(result.title)} (<code>{result.name}</code>)</h2>")
        parts.append(_claims_html(result))
        parts.append(_table(result.columns, result.rows))
        for caption, png in result.figures.items():
            encoded = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    tuning = settings.get("tuning") or {}
    if tuning:
        grid = list(dict.fromkeys(point for tuned in tuning.values() for point in tuned["validation"]))
        parts.append("<h2>Tuning</h2>")
        parts.append(
            "<p>Each condition whose claim compares accuracies trained at the optimizer and learning rate "
            "under which its first seed reached the best validation accuracy (chosen); the table gives that "
            "accuracy at each point of the grid it was tuned over.</p>"
        )
        rows = [[condition] + [_tuning_cell(tuned, point) for point in grid] for condition, tuned in tuning.items()]
        parts.append(_table(["condition"] + grid, rows))
    parts.append("<h2>Configuration</h2>")
    parts.append(_table(["setting", "value"], [[k, json.dumps(v)] for k, v in settings["base"].items()]))
    parts.append("<h2>Versions</h2>")
    parts.append(
        _table(["", ""], [[k, v] for k, v in settings["versions"].items()] + [["git commit", settings["git"]]])
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def write(results: list[Result], out: str, settings: dict, seconds: float) -> str:
    """report.html, one PNG per figure and metrics.json in ``out``; returns the report's path."""
    os.makedirs(out, exist_ok=True)
    figure = re.compile(rf"^({'|'.join(map(re.escape, EXPERIMENTS))})-\d+\.png$")
    for name in os.listdir(out):  # an earlier report's figures, which this report may not replace
        if figure.match(name):
            os.remove(os.path.join(out, name))
    for result in results:
        for index, png in enumerate(result.figures.values(), start=1):
            with open(os.path.join(out, f"{result.name}-{index}.png"), "wb") as handle:
                handle.write(png)
    metrics = {
        "settings": settings,
        "seconds": seconds,
        "experiments": {
            r.name: {
                "claims": [dataclasses.asdict(c) for c in r.claims],
                "table": {"columns": r.columns, "rows": r.rows},
                "runs": r.metrics,
            }
            for r in results
        },
    }
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=1)
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render(results, settings, seconds))
    return path


def summary(results: list[Result]) -> str:
    """A plain-text table: experiment, verdict, what was measured and, below it, the interval the
    verdict was decided on."""
    lines = [f"{'experiment':<22} {'verdict':<14} measured / interval (mean [95% interval])"]
    for result in results:
        for claim in result.claims:
            lines.append(f"{result.name:<22} {claim.verdict:<14} {claim.measured}")
            lines.append(f"{'':<37} {claim.interval}")
    return "\n".join(lines)


def reproduce(
    names: list[str],
    scale: str = "quick",
    out: str = "runs/report",
    data: str = "mnist1d",
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    command: str = "",
    jobs: int = 1,
) -> tuple[list[Result], str]:
    """Run the named experiments at ``scale`` and write the report into ``out``.

    ``jobs`` runs train side by side in worker processes; each run uses one torch thread
    whatever ``jobs`` is, so the numbers do not depend on it. Finished runs are kept in
    ``out/runs``; running again into the same ``out`` reuses them (an interrupted --full run
    loses only the runs in progress)."""
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got scale={scale!r}")
    start = time.perf_counter()
    dataset = data_module.load(data)
    lab = Lab(SCALES[scale], dataset, data=data, seed=seed, log=log, jobs=jobs, store=os.path.join(out, "runs"))
    results = []
    for name in names:
        if log:
            log(f"{name}:")
        began = time.perf_counter()
        results.append(EXPERIMENTS[name](lab))
        if log:
            log(f"{name}: done in {time.perf_counter() - began:.0f} s")
    seconds = time.perf_counter() - start
    settings = {
        "scale": scale,
        "scale_settings": dataclasses.asdict(SCALES[scale]),
        "data": data,
        "seeds": lab.seeds,
        "jobs": jobs,
        "base": dataclasses.asdict(lab.base),
        "versions": versions(),
        "git": git_commit(),
        "command": command or f"batchnorm reproduce --scale {scale}",
        "tuning": lab.tuning,
    }
    return results, write(results, out, settings, seconds)
