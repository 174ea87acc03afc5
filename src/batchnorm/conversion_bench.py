"""The conversion rows of ``batchnorm bench --models``: users' networks, written with torch's
layers, before and after ``batchnorm.convert``, and folded for inference.

For a CIFAR ResNet-20 (batch 128, 32x32), torchvision's ResNet-18 (batch 32, 112x112), a
VGG-11-BN-LeakyReLU (batch 128, 32x32) and a CIFAR MobileNetV2 (batch 32, 32x32), NCHW and
channels_last: the median SGD training step of the torch model and of ``convert(model)`` from
the same weights, in alternating rounds; and the median eval forward (under no_grad, at the
``EVAL_BATCH`` of each network: 256 for ResNet-20) of the torch model, of ``convert(model)``
and of ``fold(convert(model))``. With ``compiled``, ``torch.compile`` of the torch model's
training step (inductor, its compile time left out) is a reference row for ResNet-20.
"""

from __future__ import annotations

import statistics
import time

import torch

from .conversion import convert
from .fold import fold
from .model_bench import sgd_step
from .networks import mobilenet_v2, resnet18, resnet20, vgg11

# network -> (constructor of its torch version, training batch, eval batch, input side)
NETWORKS = {
    "ResNet-20": (resnet20, 128, 256, 32),
    "ResNet-18 (112x112)": (resnet18, 32, 64, 112),
    "VGG-11-BN-LeakyReLU": (vgg11, 128, 256, 32),
    "MobileNetV2 (CIFAR)": (mobilenet_v2, 32, 128, 32),
}
LAYOUTS = ("NCHW", "channels_last")
TRAIN = ("torch", "convert", "torch.compile")
EVAL = ("torch", "convert", "fold(convert)")


def _layout(t, layout: str):
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _torch_model(network: str, layout: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _layout(NETWORKS[network][0](torch.nn.BatchNorm2d), layout)


def _inference(model, data):
    model.eval()

    def run():
        with torch.no_grad():
            model(data)

    return run


def _alternate(calls: dict, repeat: int, clock) -> dict:
    """Median seconds of each call over ``repeat`` rounds in alternating order, after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    names = list(calls)
    for k in range(repeat):
        for name in names if k % 2 == 0 else names[::-1]:
            start = clock()
            calls[name]()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(repeat: int, networks=None, compiled: bool = True, clock=time.perf_counter) -> dict:
    """{(network, layout): {"train": {variant: s}, "eval": {variant: s}}} for ``networks`` (names
    of NETWORKS, all by default)."""
    results = {}
    for network in NETWORKS if networks is None else networks:
        _, batch, eval_batch, side = NETWORKS[network]
        generator = torch.Generator().manual_seed(1)
        for layout in LAYOUTS:
            data = _layout(torch.randn(batch, 3, side, side, generator=generator), layout)
            labels = torch.randint(0, 10, (batch,), generator=generator)
            models = {"torch": _torch_model(network, layout)}
            models["convert"] = convert(models["torch"])
            steps = {name: sgd_step(model, data, labels) for name, model in models.items()}
            if compiled and network == "ResNet-20":
                reference = _torch_model(network, layout)
                steps["torch.compile"] = sgd_step(torch.compile(reference), data, labels)
            train = _alternate(steps, repeat, clock)
            # the running statistics of the training rounds above: the same in both models
            served = fold(convert(models["torch"].eval()))
            eval_data = _layout(torch.randn(eval_batch, 3, side, side, generator=generator), layout)
            runs = {name: _inference(model, eval_data) for name, model in models.items()}
            runs["fold(convert)"] = _inference(served, eval_data)
            results[(network, layout)] = {"train": train, "eval": _alternate(runs, repeat, clock)}
    return results


def report(results: dict) -> str:
    lines = [
        "A user's network with torch's BatchNorm2d, after batchnorm.convert (BN + add + activation fused), and "
        "folded for inference: medians in ms of alternating rounds, speed against the torch model's",
        "",
        "| network | layout | train: torch ms | convert | torch.compile | eval: torch ms | convert | fold(convert) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (network, layout), result in results.items():
        cells = []
        for mode, variants in (("train", TRAIN), ("eval", EVAL)):
            times = result[mode]
            cells.append(f"{times['torch'] * 1e3:.1f}")
            for variant in variants[1:]:
                t = times.get(variant)
                cells.append("n/a" if t is None else f"{t * 1e3:.1f} ({times['torch'] / t:.2f}x)")
        lines.append(f"| {network} | {layout} | " + " | ".join(cells) + " |")
    batches = ", ".join(f"{name} {spec[1]} / {spec[2]}" for name, spec in NETWORKS.items())
    lines += ["", f"Batch, training / eval: {batches}"]
    return "\n".join(lines)
