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
    parser.add_argument("--shape", metavar="T,D,F,E,K",
                        help="time this shape alone instead of --shapes (tokens, dim, expert_dim, "
                             "experts, top-k)")
    parser.add_argument("--isolated", action="store_true",
                        help="time each row in its own rounds beside the limit rows only, so no "
                             "heavy row shares its rounds (slower)")


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.bench import main, parse_shape

    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    custom = None
    if args.shape is not None:
        try:
            custom = parse_shape(args.shape)
        except ValueError as error:
            raise UsageError(f"--shape: {error}") from None
    main(args.shapes, args.repeats, not args.no_compile, custom, args.isolated)
    return 0
