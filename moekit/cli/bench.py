"""``moekit bench``: the flags of the CPU layer benchmark, checked, passed to
``moekit.bench`` (the same flags as ``python benchmarks/moe_speed.py``)."""

from __future__ import annotations

import argparse

from moekit.bench.shapes import SHAPES
from moekit.errors import UsageError

HELP = "CPU speed of the MoE layer against the FLOPs limit and peers (docs/benchmarks.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.bench import main

    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    main(args.shapes, args.repeats, not args.no_compile)
    return 0
