"""``batchnorm bench --sync``: SyncBatchNorm over 2 gloo processes on this machine against one
process with the global batch, and what its collectives cost.

For each shape (the global batch), medians of ``repeat`` forward+backward calls: one process
with batchnorm.BatchNorm on the whole batch and torch's threads (the machine's cores), then 2
processes of one thread each, SyncBatchNorm on half the batch each (a barrier before every
call, the slower rank's time counted). Then, in the 2 processes, each layer's two collectives
alone: the forward's all_gather of 3 x C float64 per rank and the backward's all_reduce of
2 x C float64.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import layers, sync
from .lab import processes

SHAPES = [(128, 16, 32, 32), (128, 64, 8, 8), (32, 256, 14, 14), (256, 512)]


def _median_ms(fn, repeat: int, before=lambda: None) -> float:
    for _ in range(3):
        before()
        fn()
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _step(layer, x, dy):
    def call():
        layer(x).backward(dy)
        x.grad = None

    return call


def _one_process(shape, repeat: int) -> float:
    x = torch.randn(shape).requires_grad_(True)
    return _median_ms(_step(layers.BatchNorm(shape[1]), x, torch.randn(shape)), repeat)


def _worker(rank, port, shapes, repeat, path):
    processes.join_group(rank, 2, port)
    rows = []
    try:
        for shape in shapes:
            half = (shape[0] // 2, *shape[1:])
            x = torch.randn(half).requires_grad_(True)
            step = _median_ms(_step(sync.SyncBatchNorm(shape[1]), x, torch.randn(half)), repeat, dist.barrier)
            C = shape[1]
            local, gathered = torch.zeros(3, C, dtype=torch.float64), [torch.empty(3, C, dtype=torch.float64)] * 2
            gather = _median_ms(lambda g=gathered, t=local: dist.all_gather(g, t), repeat, dist.barrier)
            sums = torch.zeros(2, C, dtype=torch.float64)
            reduce = _median_ms(lambda t=sums: dist.all_reduce(t), repeat, dist.barrier)
            measured = torch.tensor([step, gather, reduce], dtype=torch.float64)
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)  # the slower rank's
            rows.append(measured.tolist())
        if rank == 0:
            torch.save(rows, path)
    finally:
        dist.destroy_process_group()


def measure(repeat: int = 20, shapes=None) -> list[dict]:
    shapes = shapes or SHAPES
    one = [_one_process(shape, repeat) for shape in shapes]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rows.pt")
        mp.start_processes(
            _worker, args=(processes.free_port(), shapes, repeat, path), nprocs=2, join=True, start_method="spawn"
        )
        rows = torch.load(path)
    return [
        {"shape": shape, "one": o, "two": step, "gather": gather, "reduce": reduce, "C": shape[1]}
        for shape, o, (step, gather, reduce) in zip(shapes, one, rows, strict=True)
    ]


def report(rows: list[dict]) -> str:
    lines = [
        f"SyncBatchNorm, forward+backward, float32, medians; one process: BatchNorm on the global batch with "
        f"{torch.get_num_threads()} torch threads; two processes: gloo on 127.0.0.1, one thread each, half the "
        "batch each (the slower rank):",
        "",
        "| global batch | one process (ms) | 2 processes (ms) | 2 processes / one | all_gather 3 x C float64 (us) "
        "| all_reduce 2 x C float64 (us) | bytes sent a layer per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {shape} | {r['one']:.3f} | {r['two']:.3f} | {r['two'] / r['one']:.2f}x | {r['gather'] * 1e3:.0f} "
            f"| {r['reduce'] * 1e3:.0f} | {5 * r['C'] * 8} |"
        )
    return "\n".join(lines)
