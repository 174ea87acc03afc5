"""The ``batchnorm`` command."""

from __future__ import annotations

import argparse
import sys


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape must be comma-separated integers like 64,64,32,32, got {text!r}"
        ) from None
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape must have 2 to 4 positive sizes, got {text!r}")
    return shape


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
    bench.add_argument("--shape", type=_shape, action="append", help="a shape to time (repeatable); default: all five")
    bench.add_argument("--repeat", type=_positive, default=20, help="timed calls per median (default: 20)")
    bench.add_argument("--no-compile", action="store_true", help="leave out torch.compile (saves its compile time)")
    bench.add_argument("--no-interleaved", action="store_true", help="leave out the conv/BN interleaving measurement")
    bench.add_argument("--out", help="also write the report to this file")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "bench":
        from . import bench

        text = bench.run(args.shape, args.repeat, not args.no_compile, not args.no_interleaved)
        print(text)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
