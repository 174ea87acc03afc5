"""``batchnorm bench --sweep``: forward+backward over the shapes real CNNs have.

For each shape, this project's layer against torch's in the same layout and in torch's
other layout (4-D and 5-D data), in interleaved shuffled rounds (``bench._alternating``),
float32, medians. The report prints the machine, every ratio, the worst and the geometric
mean: torch's time in the same layout over ours, and torch's faster layout over ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import bench

# where the shapes come from: the shapes
SOURCES: dict[str, list[tuple[int, ...]]] = {
    "ResNet-18/50 at 224, batch 32": [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)],
    "ResNet-50 bottleneck, batch 32": [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)],
    "CIFAR ResNet-20/56, batch 128": [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)],
    "MobileNetV2-like, batch 32": [(32, 96, 56, 56), (32, 144, 28, 28)],
    "1-D signals": [(64, 128, 100)],
    "1-D features": [(256, 512)],
    "3-D volumes": [(8, 32, 16, 16, 16)],
}
SHAPES: list[tuple[str, tuple[int, ...]]] = [(source, shape) for source, shapes in SOURCES.items() for shape in shapes]


@dataclass
class SweepRow:
    source: str
    shape: tuple[int, ...]
    layout: str
    ours: float  # median seconds, forward+backward
    same: float  # torch in the same layout
    other: float | None  # torch in its other layout (4-D and 5-D only)

    @property
    def vs_same(self) -> float:
        return self.same / self.ours

    @property
    def vs_best(self) -> float:
        return min(self.same, math.inf if self.other is None else self.other) / self.ours


def layouts(shape: tuple[int, ...]) -> list[str]:
    return ["NCHW", "channels_last"] if len(shape) in bench._CHANNELS_LAST else ["contiguous"]


def measure(shapes=None, repeat: int = 20) -> list[SweepRow]:
    rows = []
    for source, shape in shapes or SHAPES:
        ours, theirs = bench._modules(shape[1], len(shape))
        base = torch.randn(shape)
        kinds = layouts(shape)
        for layout in kinds:
            calls = {"ours": bench._operation(ours, bench._layout(base, layout), "forward+backward")}
            for other in kinds:
                calls[other] = bench._operation(theirs, bench._layout(base, other), "forward+backward")
            times = bench._alternating(calls, repeat, per_round=1)
            other = next((times[k] for k in kinds if k != layout), None)
            rows.append(SweepRow(source, shape, layout, times["ours"], times[layout], other))
    return rows


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def report(rows: list[SweepRow], bandwidth: float, copy_bytes: int) -> str:
    lines = bench.header(bandwidth, copy_bytes)
    lines += ["Forward+backward, float32, medians of interleaved rounds:", ""]
    lines.append(
        "| source | shape | layout | batchnorm (ms) | torch, same layout (ms) | torch, other layout (ms) "
        "| same layout / ours | faster torch / ours |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        other = "" if row.other is None else f"{row.other * 1e3:.3f}"
        lines.append(
            f"| {row.source} | {'x'.join(map(str, row.shape))} | {row.layout} | {row.ours * 1e3:.3f} "
            f"| {row.same * 1e3:.3f} | {other} | {row.vs_same:.2f}x | {row.vs_best:.2f}x |"
        )
    lines.append("")
    for name, key in (("same layout / ours", "vs_same"), ("faster torch / ours", "vs_best")):
        ratios = [getattr(row, key) for row in rows]
        worst = min(rows, key=lambda row: getattr(row, key))
        lines.append(
            f"{name}: worst {getattr(worst, key):.2f}x ({'x'.join(map(str, worst.shape))} {worst.layout}), "
            f"geometric mean {_geometric_mean(ratios):.2f}x over {len(ratios)} rows"
        )
    return "\n".join(lines)


def run(repeat: int = 20, shapes=None) -> str:
    bandwidth, copy_bytes = bench.copy_bandwidth(repeat)
    return report(measure(shapes, repeat), bandwidth, copy_bytes)
