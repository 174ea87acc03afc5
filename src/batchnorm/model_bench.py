"""``batchnorm bench --models``: whole networks trained with torch's batch norm, this
project's, and its fused layers (networks.py), and what each keeps for backward.

For the CIFAR ResNet-20 and VGG-11-BN-LeakyReLU at 32x32, batch 128, NCHW and
channels_last: the median SGD training step (forward, cross-entropy loss, backward,
step) of copies of the network with the same initial weights (torch's BatchNorm2d, this
project's, its BatchNormAct2d, and for VGG's invertible LeakyReLU in-place), timed in
alternating rounds, ratios against torch's from the same rounds; the bytes of the
activations autograd saves for backward in one training forward (unique storages, the
parameters left out, torch.autograd.graph.saved_tensors_hooks); the minor page faults a
step (getrusage: the pages the allocator hands out fresh, which the kernel zeroes on first
touch; this project's outputs come from buffers.py's pool, which keeps its pages); and the
process's peak resident memory.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from .layers import BatchNorm2d
from .networks import resnet20, vgg11

NETWORKS = {"ResNet-20": resnet20, "VGG-11-BN-LeakyReLU": vgg11}
VARIANTS = ("torch", "batchnorm", "fused", "in-place")


def variants(network: str) -> tuple[str, ...]:
    """The variants a network has: in-place activated batch norm needs an invertible
    activation, which ResNet's relu is not."""
    return VARIANTS if network.startswith("VGG") else VARIANTS[:3]


LAYOUTS = ("NCHW", "channels_last")


def build(network: str, variant: str, layout: str) -> torch.nn.Module:
    """One copy of ``network`` with ``variant``'s batch norm, its weights those of seed 0."""
    torch.manual_seed(0)
    make = NETWORKS[network]
    if variant == "fused":
        model = make(fused=True)
    elif variant == "in-place":
        model = make(fused=True, inplace=True)
    else:
        model = make(torch.nn.BatchNorm2d if variant == "torch" else BatchNorm2d)
    return model.to(memory_format=torch.channels_last) if layout == "channels_last" else model


def saved_bytes(model: torch.nn.Module, data: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward of ``model`` on ``data``:
    each storage once, the model's parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(data)
    del out
    return sum(seen.values())


def sgd_step(model: torch.nn.Module, data: torch.Tensor, labels: torch.Tensor):
    """One SGD training step of ``model`` (forward, cross-entropy, backward, step) as a call."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.train()
        loss = torch.nn.functional.cross_entropy(model(data), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(repeat: int, batch: int = 128, networks=tuple(NETWORKS), clock=time.perf_counter) -> dict:
    """{(network, layout): {"step": {variant: median s}, "saved": {variant: bytes}, "faults":
    {variant: median minor page faults a step}}}; each network and layout's variants in
    ``repeat`` alternating rounds after one warm-up step each."""
    results = {}
    torch.manual_seed(1)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    for network in networks:
        for layout in LAYOUTS:
            data = images.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else images
            names = variants(network)
            models = {variant: build(network, variant, layout) for variant in names}
            saved = {variant: saved_bytes(model, data) for variant, model in models.items()}
            steps = {variant: sgd_step(model, data, labels) for variant, model in models.items()}
            times: dict[str, list[float]] = {variant: [] for variant in names}
            faults: dict[str, list[int]] = {variant: [] for variant in names}
            for step in steps.values():
                step()
            for k in range(repeat):
                order = names if k % 2 == 0 else names[::-1]
                for variant in order:
                    before = _page_faults()
                    start = clock()
                    steps[variant]()
                    times[variant].append(clock() - start)
                    faults[variant].append(_page_faults() - before)
            results[(network, layout)] = {
                "step": {variant: statistics.median(t) for variant, t in times.items()},
                "saved": saved,
                "faults": {variant: statistics.median(f) for variant, f in faults.items()},
            }
    return results


def peak_rss_bytes() -> int:
    """The process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def report(results: dict, machine: str, batch: int = 128) -> str:
    lines = [
        machine,
        "",
        f"SGD training step at batch {batch}, 32x32 input: medians in ms of alternating rounds, "
        "speed against torch.nn.BatchNorm2d's in the same rounds; saved activations in MiB",
        "",
        "| network | layout | torch ms | batchnorm | fused | in-place | saved by torch | fused | in-place |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (network, layout), result in results.items():
        step, saved = result["step"], result["saved"]
        cells = [f"{step['torch'] * 1e3:.1f}"]
        for variant in VARIANTS[1:]:
            cells.append(
                f"{step[variant] * 1e3:.1f} ({step['torch'] / step[variant]:.2f}x)" if variant in step else "n/a"
            )
        cells.append(f"{saved['torch'] / 2**20:.1f} MiB")
        for variant in VARIANTS[2:]:
            cells.append(f"{saved[variant] / saved['torch']:.2f}x" if variant in saved else "n/a")
        lines.append(f"| {network} | {layout} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Minor page faults a step (medians): fresh pages from the allocator, each zeroed by the kernel on first touch",
        "",
        "| network | layout | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for (network, layout), result in results.items():
        faults = result.get("faults", {})
        cells = [f"{faults[v]:.0f}" if v in faults else "n/a" for v in VARIANTS]
        lines.append(f"| {network} | {layout} | " + " | ".join(cells) + " |")
    lines += ["", f"Peak resident memory of this process: {peak_rss_bytes() / 2**20:.0f} MiB"]
    return "\n".join(lines)
