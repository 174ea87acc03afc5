"""Benchmarks against PyTorch on the CPU: medians, ratios and achieved bandwidth.

For each shape and layout: forward-train, forward-eval and forward+backward of
this project's layer, torch eager in NCHW, torch eager in channels_last and
torch.compile (inductor) in the row's layout. Bandwidth: a memory copy on a
working set larger than twice the last-level cache, measured in the same
process; forward-train moves 8 bytes per float32 element (one read, one write).
Then, for each 4-D shape, float16 and bfloat16 data in NCHW through float32 layers
(as under autocast), this project's against torch's.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import torch

from . import crossover
from .buffers import pool
from .launch import cache_size_bytes, last_level_cache_bytes
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

SHAPES = [(64, 64, 32, 32), (32, 256, 14, 14), (64, 64, 56, 56), (256, 1024), (128, 16, 40)]
OPERATIONS = ("forward-train", "forward-eval", "forward+backward")


@dataclass
class Row:
    shape: tuple[int, ...]
    layout: str
    operation: str
    times: dict[str, float]  # implementation -> median seconds
    dtype: torch.dtype = torch.float32


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(repeat: int) -> tuple[float, int]:
    """Bytes per second of a copy (read + write) over 2 x 2 x LLC bytes, and that size."""
    size = 2 * last_level_cache_bytes()
    source = torch.ones(size // 4)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), repeat)
    return 2 * size / seconds, 2 * size


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` in ``layout``: "channels_last" (channels_last_3d for 5-D data), else contiguous."""
    if layout == "channels_last":
        return x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
    return x.contiguous()


_MODULES = {2: (BatchNorm1d, torch.nn.BatchNorm1d), 3: (BatchNorm1d, torch.nn.BatchNorm1d)}
_MODULES |= {4: (BatchNorm2d, torch.nn.BatchNorm2d), 5: (BatchNorm3d, torch.nn.BatchNorm3d)}


def _modules(channels: int, rank: int):
    """This project's layer and torch's for data of ``rank`` dimensions."""
    ours, theirs = _MODULES[rank]
    return ours(channels), theirs(channels)


def _operation(module: torch.nn.Module, x: torch.Tensor, operation: str) -> Callable[[], object]:
    if operation == "forward-train":
        module.train()
        return lambda: module(x)
    if operation == "forward-eval":
        module.eval()
        return lambda: module(x)
    module.train()
    leaf = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(leaf)

    def step():
        module(leaf).backward(grad)
        leaf.grad = None

    return step


FLOOR = "5-pass floor"


def _five_passes(x: torch.Tensor) -> Callable[[], object]:
    """The memory traffic every forward+backward has, and nothing else: y = x (read x, write
    y) and dx = dy + x (read dy and x, write dx), torch's copy and add into outputs made once."""
    dy, y, dx = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)

    def passes():
        y.copy_(x)
        torch.add(dy, x, out=dx)

    return passes


LAYER_FLOOR = "layer floor"


class _FivePasses(torch.autograd.Function):
    """The five passes as a layer with its own kernels has to run them: y = x in the forward
    of an autograd.Function, dx = dy + x in its backward, outputs from the buffer pool (so
    that autograd takes dx as the gradient, as it takes the layer's, without a copy)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return pool.empty_like(x).copy_(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return torch.add(dy, x, out=pool.empty_like(x))


class _PassesLayer(torch.nn.Module):
    """A module around one of the passes' autograd.Functions, as the layers are around theirs."""

    def __init__(self, passes: type[torch.autograd.Function]):
        super().__init__()
        self.passes = passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.passes.apply(x)


def _in_layer(passes: type[torch.autograd.Function], x: torch.Tensor) -> Callable[[], object]:
    """``passes`` in a module, timed the way the layers are (forward+backward from a leaf, its
    gradient then dropped): with _FivePasses the floor of any layer written in Python around
    its own kernels (the five passes, plus the module call, the autograd.Function and
    autograd's backward machinery)."""
    return _operation(_PassesLayer(passes), x, "forward+backward")


BATCH_NORM_PASSES = "batch-norm passes"


class _BatchNormPasses(torch.autograd.Function):
    """The layer floor plus the reads that batch norm cannot skip: its statistics must be known
    before its first output, so the forward reads x for them before y = x (x.sum()), and so
    must sum(dy) and sum(dy * xhat) before the first dx, so the backward reads dy and x before
    dx = dy + x (dy.sum(), x.sum()). Each a whole-tensor pass of torch's: no per-channel work,
    no arithmetic beyond the additions, and no fusion either: so not a floor, since a kernel
    that reads each channel the second time while it is still in L2 reads less memory than
    these passes once the tensors outgrow the last-level cache; while they fit in it, both
    read the second time from a cache."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        x.sum()
        return pool.empty_like(x).copy_(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy.sum()
        x.sum()
        return torch.add(dy, x, out=pool.empty_like(x))


def measure(shapes, repeat: int, with_compile: bool) -> list[Row]:
    """For each row, every eager implementation is called in turn, ``repeat`` rounds or more, so
    that the machine's drift during the run hits all of them alike; the median over rounds.
    torch.compile is timed in rounds of its own."""
    rows = []
    for shape in shapes:
        rank = len(shape)
        layouts = ["NCHW", "channels_last"] if rank == 4 else ["contiguous"]
        base = torch.randn(shape)
        ours, theirs = _modules(shape[1], rank)
        for layout in layouts:
            x = _layout(base, layout)
            for operation in OPERATIONS:
                calls = {"batchnorm": _operation(ours, x, operation)}
                if rank == 4:
                    calls["torch NCHW"] = _operation(theirs, _layout(base, "NCHW"), operation)
                    calls["torch channels_last"] = _operation(theirs, _layout(base, "channels_last"), operation)
                else:
                    calls["torch"] = _operation(theirs, x, operation)
                if rank == 4 and operation == "forward+backward":
                    calls[FLOOR] = _five_passes(x)  # in the same rounds: the same cache pressure
                    calls[LAYER_FLOOR] = _in_layer(_FivePasses, x)
                    calls[BATCH_NORM_PASSES] = _in_layer(_BatchNormPasses, x)
                times = _alternating(calls, repeat, per_round=1)
                if with_compile:
                    # rounds of its own: an eager call right after a compiled one ran slower
                    # (10 us more on a 46 us eval of 128x16x40), and the targets compare eager
                    compiled = _operation(torch.compile(theirs, dynamic=False), x, operation)
                    alone = _alternating({"torch.compile": compiled}, repeat, per_round=1)
                    times["torch.compile"] = alone["torch.compile"]
                    torch._dynamo.reset()
                rows.append(Row(shape, layout, operation, times))
    return rows


def _alternating(
    functions: dict[str, Callable[[], object]], repeat: int, per_round: int = 5, budget: float = 0.5
) -> dict[str, float]:
    """Medians over rounds that call each function in turn, so that drift in the machine's
    speed hits all of them alike, in a shuffled order; a round's sample is the median of
    ``per_round`` calls.

    At least ``repeat`` rounds; fast rows get more, up to ``budget`` seconds (at most
    50 x ``repeat`` rounds), since their medians need more samples on a noisy machine.
    """
    start = time.perf_counter()
    for fn in functions.values():
        median_time(fn, 1, warmup=3)
    round_seconds = (time.perf_counter() - start) / 4 * per_round
    rounds = max(repeat, 5, min(50 * repeat, int(budget / max(round_seconds, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    # a new order every round (the same orders every run): what a call costs depends on
    # the call before it (the cache it leaves: one kernel timed against a copy of itself
    # read 8% faster when it came second), so no function may always follow the same one
    order = list(functions.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name, fn in order:
            samples[name].append(median_time(fn, per_round, warmup=0))
    return {name: statistics.median(values) for name, values in samples.items()}


def half_precision(shapes, repeat: int) -> list[Row]:
    """float16 and bfloat16 NCHW data of each 4-D shape through float32 layers (parameters
    and buffers in float32, as under autocast): this project's layer and torch's, in
    alternating rounds."""
    rows = []
    for shape in (s for s in shapes if len(s) == 4):
        ours, theirs = _modules(shape[1], 4)
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            for operation in OPERATIONS:
                calls = {"batchnorm": _operation(ours, x, operation), "torch": _operation(theirs, x, operation)}
                rows.append(Row(shape, "NCHW", operation, _alternating(calls, repeat, per_round=1), dtype))
    return rows


def interleaved(repeat: int) -> dict[str, float]:
    """conv -> batch norm -> conv, timed call by call, so that torch's OpenMP team and Numba's
    alternate: the batch norm after a conv, and the conv after the batch norm (does it start slower?)."""
    x = torch.randn(32, 64, 28, 28)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    norms = {"batchnorm": BatchNorm2d(64), "torch BN": torch.nn.BatchNorm2d(64)}
    samples: dict[str, list[float]] = {}
    with torch.no_grad():
        for round_ in range(max(repeat, 5) + 2):
            for name, norm in norms.items():
                start = time.perf_counter()
                h = conv(x)
                after_conv = time.perf_counter()
                h = norm(h)
                after_norm = time.perf_counter()
                conv(h)
                end = time.perf_counter()
                if round_ >= 2:  # warm-up rounds
                    samples.setdefault(f"{name} after a conv", []).append(after_norm - after_conv)
                    samples.setdefault(f"conv after {name}", []).append(end - after_norm)
                    samples.setdefault(f"conv before {name}", []).append(after_conv - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def mlp_training_step(repeat: int) -> dict[str, float]:
    """One SGD step of the paper's MLP (784-100-100-100-10, sigmoid, BN before each activation,
    batch 60) with this project's batch norm, with torch's, and without, in alternating rounds."""
    from .lab.models import mlp

    x = torch.rand(60, 784)
    y = torch.randint(0, 10, (60,))
    steps = {}
    for norm in ("bn", "torch", "none"):
        torch.manual_seed(0)
        model = mlp(784, 10, norm=norm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[norm] = step
    return _alternating(steps, repeat, budget=3.0)


def resnet_steps(repeat: int, batch: int = 128) -> dict[str, dict[str, float]]:
    """A CIFAR ResNet-20 (networks.resnet20) at ``batch``, its every batch norm torch's or
    this project's (the same initial weights): an SGD training step, and an eval forward
    under no_grad, in NCHW and channels_last; each layout's two models in alternating rounds.
    Returns {"<layout> train" or "<layout> eval": {"torch": s, "batchnorm": s}}."""
    from .networks import resnet20

    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times = {}
    for layout in ("NCHW", "channels_last"):
        data = _layout(x, layout)
        steps, evals = {}, {}
        for name, norm in (("torch", torch.nn.BatchNorm2d), ("batchnorm", BatchNorm2d)):
            torch.manual_seed(0)
            model = resnet20(norm)
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def step(model=model, optimizer=optimizer, data=data):
                model.train()
                loss = torch.nn.functional.cross_entropy(model(data), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            def forward(model=model, data=data):
                model.eval()
                with torch.no_grad():
                    model(data)

            steps[name], evals[name] = step, forward
        times[f"{layout} train"] = _alternating(steps, repeat, per_round=1, budget=0.0)
        times[f"{layout} eval"] = _alternating(evals, repeat, per_round=1, budget=0.0)
    return times


def caches(base: str = "/sys/devices/system/cpu/cpu0/cache") -> list[str]:
    """CPU 0's data and unified caches from sysfs, smallest first: "L1d 48 KiB", "L2 1 MiB",
    "L3 32 MiB (2 CPUs)" (how many CPUs share it, where more than one); empty when unknown."""
    found = []
    with contextlib.suppress(OSError, ValueError):
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            folder = os.path.join(base, entry)
            fields = {}
            for name in ("level", "type", "size", "shared_cpu_list"):
                with contextlib.suppress(OSError), open(os.path.join(folder, name)) as handle:
                    fields[name] = handle.read().strip()
            if fields.get("type") == "Instruction" or "size" not in fields:
                continue
            number = cache_size_bytes(fields["size"])
            sharing = _cpu_count(fields.get("shared_cpu_list", ""))
            label = f"L{fields.get('level', '?')}{'d' if fields.get('type') == 'Data' else ''}"
            found.append((number, f"{label} {_size(number)}" + (f" ({sharing} CPUs)" if sharing > 1 else "")))
    return [text for _, text in sorted(found)]


def _cpu_count(cpu_list: str) -> int:
    """How many CPUs a sysfs list such as "0-3,8" names."""
    count = 0
    for part in filter(None, cpu_list.split(",")):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def _size(number: int) -> str:
    return f"{number // 1024**2} MiB" if number % 1024**2 == 0 else f"{number // 1024} KiB"


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def machine() -> str:
    """The CPU model, cores, caches, memory and versions: what two tables need to be compared."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = _memory_bytes()
    return (
        f"{model}, {os.cpu_count()} cores, {', '.join(caches()) or 'caches unknown'}"
        + ("" if memory is None else f", {memory / 1024**3:.0f} GiB memory")
        + f"; torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
        f"({numba.threading_layer() if _numba_ran() else 'n/a'} threading layer)"
    )


def _numba_ran() -> bool:
    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


def header(bandwidth: float, copy_bytes: int) -> list[str]:
    """The machine line and the copy bandwidth, then a blank line: how every table starts."""
    return [
        f"Machine: {machine()}",
        "",
        f"Memory copy over {copy_bytes // 1024**2} MiB (read + write): {bandwidth / 1e9:.1f} GB/s",
        "",
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def report(
    rows: list[Row],
    bandwidth: float,
    copy_bytes: int,
    mixed: dict[str, float] | None,
    mlp_step: dict[str, float] | None = None,
    half: list[Row] | None = None,
    resnet: dict[str, dict[str, float]] | None = None,
) -> str:
    lines = header(bandwidth, copy_bytes)
    names = list(dict.fromkeys(name for row in rows for name in row.times))
    columns = ["shape", "layout", "operation", *[f"{n} (ms)" for n in names], "same layout / ours", "best torch / ours"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        ours = row.times["batchnorm"]
        same = row.times.get({"NCHW": "torch NCHW", "channels_last": "torch channels_last"}.get(row.layout, "torch"))
        best = min(t for name, t in row.times.items() if name.startswith("torch"))
        cells = [
            "x".join(map(str, row.shape)),
            row.layout,
            row.operation,
            *[_ms(row.times[n]) if n in row.times else "" for n in names],
            f"{same / ours:.2f}x",
            f"{best / ours:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in rows:
        if row.operation == "forward-train" and row.shape == (64, 64, 56, 56):
            moved = 8 * math.prod(row.shape)
            achieved = moved / row.times["batchnorm"]
            lines.append(
                f"forward-train {'x'.join(map(str, row.shape))} {row.layout}: {achieved / 1e9:.1f} GB/s "
                f"= {100 * achieved / bandwidth:.0f}% of the copy bandwidth (8 bytes per element)"
            )
    floors = [row for row in rows if FLOOR in row.times]
    if floors:
        lines.append("")
        lines.append(
            f"forward+backward against its memory floor ({FLOOR}: torch's copy y = x and add dx = dy + x, "
            f"five tensor passes, timed in the same rounds; {LAYER_FLOOR}: the same five passes in a module "
            "with an autograd.Function, what any layer written in Python around its own kernels pays; "
            f"{BATCH_NORM_PASSES}: that layer reading x once more in the forward, and dy and x once more in the "
            "backward, each a whole-tensor sum before it writes, as an unfused batch norm must), and the times "
            "the targets ask for:"
        )
    for row in floors:
        same = row.times["torch NCHW" if row.layout == "NCHW" else "torch channels_last"]
        best = min(row.times["torch NCHW"], row.times["torch channels_last"])
        floor, ours = row.times[FLOOR], row.times["batchnorm"]
        layer, batch_norm = row.times.get(LAYER_FLOOR), row.times.get(BATCH_NORM_PASSES)
        lines.append(
            f"- {'x'.join(map(str, row.shape))} {row.layout}: floor {_ms(floor)} ms"
            + ("" if layer is None else f", layer floor {_ms(layer)} ms ({layer / floor:.2f}x the floor)")
            + (
                ""
                if batch_norm is None
                else f", {BATCH_NORM_PASSES} {_ms(batch_norm)} ms ({batch_norm / floor:.2f}x the floor)"
            )
            + f", ours {_ms(ours)} ms ({ours / floor:.2f}x the floor); 3x torch's same layout needs "
            f"{_ms(same / 3)} ms ({same / 3 / floor:.2f}x the floor), 1.3x its faster layout "
            f"{_ms(best / 1.3)} ms ({best / 1.3 / floor:.2f}x the floor)"
        )
    if half:
        lines += ["", "Half-precision data (NCHW) through float32 layers, as under autocast, medians:", ""]
        lines.append("| shape | dtype | operation | batchnorm (ms) | torch (ms) | torch / ours |")
        lines.append("|---|---|---|---|---|---|")
        for row in half:
            ours, theirs = row.times["batchnorm"], row.times["torch"]
            lines.append(
                f"| {'x'.join(map(str, row.shape))} | {str(row.dtype).removeprefix('torch.')} | {row.operation} "
                f"| {_ms(ours)} | {_ms(theirs)} | {theirs / ours:.2f}x |"
            )
    if mixed:
        lines.append("")
        lines.append(
            "Interleaved with torch ops: conv, batch norm, conv (32x64x28x28, no grad), each call timed, medians in ms:"
        )
        for name, seconds in mixed.items():
            lines.append(f"- {name}: {_ms(seconds)}")
    if mlp_step:
        lines.append("")
        lines.append(
            "Training step of the paper's MLP (784-100-100-100-10, sigmoid, BN before each activation, "
            "batch 60, SGD with momentum), medians in ms:"
        )
        lines.append(
            f"- batchnorm {_ms(mlp_step['bn'])}, torch.nn.BatchNorm1d {_ms(mlp_step['torch'])} "
            f"({mlp_step['torch'] / mlp_step['bn']:.2f}x), no batch norm {_ms(mlp_step['none'])}"
        )
    if resnet:
        lines += ["", "CIFAR ResNet-20, batch 128 (SGD training step; eval forward under no_grad), medians in ms:"]
        for name, pair in resnet.items():
            lines.append(
                f"- {name}: batchnorm {_ms(pair['batchnorm'])}, torch.nn.BatchNorm2d {_ms(pair['torch'])} "
                f"({pair['torch'] / pair['batchnorm']:.2f}x)"
            )
    lines += crossovers(crossover.measured())
    return "\n".join(lines)


def _values(n: int) -> str:
    """2^k for a power of two, else the number."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def crossovers(measured: dict[tuple, int]) -> list[str]:
    """What this process measured for the route (crossover.py): below how many values torch's
    kernel takes each kind of call, and up to how many bytes of columns short rows fold."""
    if not measured:
        return []
    route, fold = [], []
    for key, limit in sorted(measured.items(), key=str):
        if key[0] == "fold":
            fold.append(f"rows of {key[1]} B below {limit // 1024} KiB of columns")
        else:
            top = _values(crossover.TOP)
            where = (
                f"below {_values(limit)} values"
                if limit <= crossover.TOP
                else f"at every size measured (up to {top} values)"
            )
            route.append(f"{key[0]}, {key[1]}, {str(key[2]).removeprefix('torch.')}: {where}")
    lines = ["", f"Measured by this process ({crossover.__name__}): torch's kernel takes " + "; ".join(route)]
    if fold:
        lines.append("Short rows fold: " + "; ".join(fold))
    return lines


def run(
    shapes=None, repeat: int = 20, with_compile: bool = True, with_interleaved: bool = True, with_models: bool = True
) -> str:
    shapes = shapes or SHAPES
    bandwidth, copy_bytes = copy_bandwidth(repeat)
    rows = measure(shapes, repeat, with_compile)
    half = half_precision(shapes, repeat)
    mixed = interleaved(repeat) if with_interleaved else None
    resnet = resnet_steps(repeat) if with_models else None
    return report(rows, bandwidth, copy_bytes, mixed, mlp_training_step(repeat), half, resnet)
