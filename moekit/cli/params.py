"""``moekit params``: total vs active parameters and FLOPs per token of a preset, a
published architecture, a moekit JSON spec or a transformers config.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.cli.flags import require_at_least
from moekit.errors import UsageError

HELP = "total vs active parameters and FLOPs per token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?",
                        help="a preset or a known architecture (see `moekit params --list`), or "
                             "the path of a moekit JSON spec or a transformers config.json "
                             "(or its folder)")
    parser.add_argument("--list", action="store_true", help="list the names")
    parser.add_argument("--context", type=int,
                        help="keys each query attends to, for the attention FLOPs "
                             "(default: a preset's max_seq_len, else 4096)")


def is_path(name: str) -> bool:
    """A name that is not a preset or architecture is a file when it looks like one."""
    return name.endswith(".json") or "/" in name or Path(name).exists()


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.lm.presets import PRESETS
    from moekit.params import (KNOWN_ARCHITECTURES, ArchSpec, count_hf_model, count_parameters,
                               format_breakdown, format_hf_count, read_model_file,
                               spec_from_lm_config)

    if args.list or not args.name:
        log("presets: " + ", ".join(PRESETS))
        log("known architectures: " + ", ".join(KNOWN_ARCHITECTURES))
        log("or the path of a moekit JSON spec or a transformers config.json")
        return 0
    require_at_least("--context", args.context, 1,
                     "a query attends to itself at least; leave it out for the default")
    context = args.context if args.context is not None else 4096
    if args.name in PRESETS:
        spec = spec_from_lm_config(PRESETS[args.name].model, name=args.name)
        context = args.context if args.context is not None else PRESETS[args.name].model.max_seq_len
    elif args.name in KNOWN_ARCHITECTURES:
        spec = KNOWN_ARCHITECTURES[args.name]
    elif is_path(args.name):
        spec = read_model_file(args.name)
        if not isinstance(spec, ArchSpec):
            if args.context is not None:
                raise UsageError("--context sets the attention FLOPs, which a transformers "
                                 "config.json count does not give")
            log(format_hf_count(count_hf_model(spec)))
            return 0
    else:
        raise UsageError(f"unknown preset or architecture {args.name!r}; known: "
                         f"{', '.join([*PRESETS, *KNOWN_ARCHITECTURES])}, or the path of a "
                         "JSON file")
    log(format_breakdown(count_parameters(spec, context_length=context)))
    return 0
