"""The ``batchnorm`` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape must be comma-separated integers like 64,64,32,32, got {text!r}"
        ) from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape must have 2 to 5 positive sizes, got {text!r}")
    return shape


def _out_error(out: str) -> str | None:
    """Why ``out`` cannot be the output directory, found before anything runs or is written."""
    path = os.path.abspath(out)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"--out {out}: exists and is not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"--out {out}: the directory is not writable"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {out}: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: cannot create it in {parent} (not writable)"
    return None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="batchnorm", description="Exact, fast batch normalization for PyTorch.")
    commands = root.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="time this project's batch norm against torch's on the CPU",
        description="Median times of forward-train, forward-eval and forward+backward, with ratios and bandwidth.",
    )
    bench.add_argument(
        "--shape", type=_shape, action="append", help="a shape to time (repeatable; 5 sizes with --sweep only)"
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="forward+backward over the shapes of real CNNs (ResNet, CIFAR ResNet, MobileNetV2, 1-D, 3-D), "
        "both layouts, with the worst ratio and the geometric mean",
    )
    bench.add_argument(
        "--models",
        action="store_true",
        help="the SGD training step of a CIFAR ResNet-20 and a VGG-11-BN-LeakyReLU with torch's batch norm, "
        "this project's and its fused layers, both layouts, and the activations each saves for backward; then "
        "four users' networks (ResNet-20, ResNet-18, VGG-11, MobileNetV2) before and after batchnorm.convert, "
        "and folded for inference",
    )
    bench.add_argument("--repeat", type=_positive, default=20, help="timed calls per median (default: 20)")
    bench.add_argument("--no-compile", action="store_true", help="leave out torch.compile (saves its compile time)")
    bench.add_argument("--no-interleaved", action="store_true", help="leave out the conv/BN interleaving measurement")
    bench.add_argument("--no-models", action="store_true", help="leave out the CIFAR ResNet-20 steps")
    bench.add_argument(
        "--sync", action="store_true",
        help="SyncBatchNorm over 2 gloo processes against one process with the global batch, and its collectives",
    )  # fmt: skip
    bench.add_argument("--out", help="also write the report to this file")
    _add_train(commands)
    _add_lab(commands)
    inspect = commands.add_parser(
        "inspect",
        help="the batch-norm health report of a lab checkpoint",
        description="Per-layer health of the batch norms of a `batchnorm train --checkpoint-every` checkpoint, "
        "over training batches of its data: train/eval gap, running against population statistics, dead and "
        "collapsed channels, modes; each finding with what to do.",
    )
    inspect.add_argument("checkpoint", help="a checkpoint.pt written by batchnorm train")
    inspect.add_argument("--batches", type=_positive, default=10, help="training batches to look at (default: 10)")
    inspect.add_argument("--batch-size", type=_positive, help="their size (default: the run's batch size)")
    return root


def _lab_options(command) -> None:
    command.add_argument("--full", action="store_true", help="the paper's scale: 50,000 steps of batch 60, 6 seeds")
    command.add_argument("--scale", choices=("tiny", "quick", "full"), help=argparse.SUPPRESS)
    command.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    command.add_argument("--seed", type=int, default=0, help="first seed; the others follow it (default: 0)")
    command.add_argument("--data", default="mnist1d", help=_HELP["data"] + " (default: mnist1d)")
    command.add_argument(
        "--jobs",
        type=_positive,
        default=os.cpu_count() or 1,
        help="runs trained side by side, one torch thread each; the numbers do not depend on it "
        "(default: the number of cores)",
    )


def _add_lab(commands) -> None:
    from .lab.experiments import EXPERIMENTS

    reproduce = commands.add_parser(
        "reproduce",
        help="run every experiment and write report.html",
        description="Train networks with and without batch norm, test each claim, and write report.html, "
        "the figures and metrics.json (quick scale: about a minute on 2 cores).",
    )
    _lab_options(reproduce)
    experiment = commands.add_parser(
        "experiment", help="run one experiment", description="Run one experiment and write its report."
    )
    experiment.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    _lab_options(experiment)


def _lab(args) -> int:
    from .lab import report
    from .lab.data import DataError

    names = list(report.EXPERIMENTS) if args.command == "reproduce" else [args.name]
    scale = args.scale or ("full" if args.full else "quick")
    out = args.out or _default_out()
    problem = _out_error(out)
    if problem:
        print(f"batchnorm {args.command}: error: {problem}", file=sys.stderr)
        return 2
    command = " ".join(["batchnorm", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("batchnorm") else ""
    try:
        results, path = report.reproduce(
            names, scale, out, args.data, args.seed, log=print, command=command, jobs=args.jobs
        )
    except (DataError, ValueError) as error:
        print(f"batchnorm {args.command}: error: {error}", file=sys.stderr)
        return 2
    print()
    print(report.summary(results))
    print(f"\nreport: {path}")
    return 0


def _default_out() -> str:
    return time.strftime("runs/%Y%m%d-%H%M%S")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


_CHOICES = {
    "model": ("mlp", "cnn"),
    "activation": ("sigmoid", "relu", "tanh"),
    "norm": None,  # lab.models.NORMS
    "placement": ("before", "after"),
    "optimizer": ("sgd", "adam", "rmsprop"),
}
_HELP = {
    "data": "mnist1d (default, generated), digits, mnist:DIR (IDX files), csv:PATH[:LABEL], npz:PATH",
    "norm": "bn: this project's layers, torch: torch.nn's, renorm: batch renormalization, bn-l1/bn-linf: lp batch "
    "norm, ln: LayerNorm, gn: GroupNorm, in: InstanceNorm (cnn), bn-noisy: batch norm and time-varying noise "
    "(Santurkar et al.), none",
    "validation": "fraction of the training set held out; the run reports the evaluation of its best accuracy",
    "measure": "record Santurkar et al.'s landscape and ICS measures at every evaluation",
    "placement": "batch norm before or after the activation (MLP)",
    "bn_momentum": "weight of the new batch in the running averages; none: cumulative average",
    "checkpoint_every": "write OUT/checkpoint.pt every this many steps (a multiple of --eval-every; 0: never)",
    "train_eval_size": "training examples evaluated for the train accuracy",
}


def _add_train(commands) -> None:
    from .lab.models import NORMS
    from .lab.train import Config

    train = commands.add_parser(
        "train",
        help="train one configuration on any dataset",
        description="Train one network; metrics.json, metrics.csv (and checkpoint.pt) go to --out.",
    )
    choices = {**_CHOICES, "norm": NORMS}
    for spec in dataclasses.fields(Config):
        default = spec.default
        if isinstance(default, bool):
            train.add_argument("--" + spec.name.replace("_", "-"), action="store_true", help=_HELP.get(spec.name))
            continue
        kind = _optional_float if spec.name == "bn_momentum" else type(default)
        train.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=_positive if kind is int and spec.name not in ("seed", "checkpoint_every") else kind,
            default=default,
            choices=choices.get(spec.name),
            help=f"{_HELP.get(spec.name, '')} (default: {default})".strip(),
        )
    train.add_argument(
        "--nproc", type=_positive, default=1,
        help="processes on this machine, each with its part of every batch (gloo, SyncBatchNorm; default: 1)",
    )  # fmt: skip
    train.add_argument(
        "--threads", type=_positive, default=1,
        help="torch threads (default: 1, as every run of the lab, so that the numbers match its runs')",
    )  # fmt: skip
    train.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _join_torchrun() -> int:
    """Under torchrun (WORLD_SIZE and RANK in the environment, more than one process): join its
    gloo group, one torch thread a process; returns this process's rank (0 otherwise)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return 0
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank()


def _train(args) -> int:
    from .lab import train
    from .lab.data import DataError

    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(train.Config)}
    try:
        config = train.Config(**values)
    except ValueError as error:
        print(f"batchnorm train: error: {error}", file=sys.stderr)
        return 2
    out = args.out or _default_out()
    problem = _out_error(out)
    if problem:
        print(f"batchnorm train: error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.nproc > 1:
            from .lab import processes

            run = processes.train(config, args.nproc, out=out, resume=args.resume)
        else:
            import torch

            torch.set_num_threads(args.threads)  # under torchrun, _join_torchrun gives each process one
            rank = _join_torchrun()
            run = train.train(config, out=out, resume=args.resume, log=None if sys.stderr.isatty() else print)
            if rank:
                return 0  # rank 0 reports
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"batchnorm train: error: {error}", file=sys.stderr)
        return 2
    final = run.final
    print(
        f"{out}: step {final['step']}, test accuracy {final['test_accuracy']:.4f} "
        f"(best {run.best():.4f}), train accuracy {final['train_accuracy']:.4f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "bench":
        if args.models:
            from . import bench, conversion_bench, model_bench

            text = model_bench.report(model_bench.measure(args.repeat), bench.machine())
            converted = conversion_bench.measure(args.repeat, compiled=not args.no_compile)
            text += "\n\n" + conversion_bench.report(converted)
        elif args.sync:
            from . import sync_bench

            text = sync_bench.report(sync_bench.measure(args.repeat))
        elif args.sweep:
            from . import sweep

            shapes = None if args.shape is None else [("--shape", shape) for shape in args.shape]
            text = sweep.run(args.repeat, shapes)
        elif any(len(shape) == 5 for shape in args.shape or ()):
            print("error: --shape with 5 sizes needs --sweep", file=sys.stderr)
            return 2
        else:
            from . import bench

            text = bench.run(args.shape, args.repeat, not args.no_compile, not args.no_interleaved, not args.no_models)
        print(text)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text + "\n")
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "inspect":
        return _inspect(args)
    return _lab(args)


def _inspect(args) -> int:
    from .health import inspect
    from .lab import checkpoints, data
    from .lab import train as lab

    try:
        state = checkpoints.load(args.checkpoint, lab._CHECKPOINT_KEYS)
        config = lab.Config(**state["config"])
        dataset = data.load(config.data)
        model = lab.build_model(config, dataset)
        model.load_state_dict(state["model"])
    except (checkpoints.CheckpointError, data.DataError, ValueError, TypeError, RuntimeError) as error:
        print(f"batchnorm inspect: error: {error}", file=sys.stderr)
        return 2
    size = args.batch_size or config.batch_size
    x = dataset.x_train
    batches = [x[start : start + size] for start in range(0, min(len(x), size * args.batches), size)]
    print(f"{args.checkpoint}: step {state['step']}, {len(batches)} training batches of {size}")
    print(inspect(model.train(), batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
