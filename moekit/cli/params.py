"""``moekit params``: total vs active parameters and FLOPs per token of a preset or a
published architecture."""

from __future__ import annotations

import argparse

from moekit.cli.flags import require_at_least
from moekit.errors import UsageError

HELP = "total vs active parameters and FLOPs per token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a preset or a known architecture (see `moekit params --list`)",
                        nargs="?")
    parser.add_argument("--list", action="store_true", help="list the names")
    parser.add_argument("--context", type=int,
                        help="keys each query attends to, for the attention FLOPs "
                             "(default: a preset's max_seq_len, else 4096)")


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.lm.presets import PRESETS
    from moekit.params import KNOWN_ARCHITECTURES, count_parameters, format_breakdown, spec_from_lm_config

    if args.list or not args.name:
        log("presets: " + ", ".join(PRESETS))
        log("known architectures: " + ", ".join(KNOWN_ARCHITECTURES))
        return 0
    require_at_least("--context", args.context, 1,
                     "a query attends to itself at least; leave it out for the default")
    context = args.context if args.context is not None else 4096
    if args.name in PRESETS:
        spec = spec_from_lm_config(PRESETS[args.name].model, name=args.name)
        context = args.context if args.context is not None else PRESETS[args.name].model.max_seq_len
    elif args.name in KNOWN_ARCHITECTURES:
        spec = KNOWN_ARCHITECTURES[args.name]
    else:
        raise UsageError(f"unknown preset or architecture {args.name!r}; known: "
                         f"{', '.join([*PRESETS, *KNOWN_ARCHITECTURES])}")
    log(format_breakdown(count_parameters(spec, context_length=context)))
    return 0
