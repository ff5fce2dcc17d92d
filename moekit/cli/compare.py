"""``moekit compare``: an MoE preset against the dense one at equal active parameters, at
equal steps and at equal time, over several seeds, with learning rates chosen on a held-out
half of the validation split (moekit.lm.comparison); ``--resume DIR`` continues one."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from moekit.cli.flags import (LAYOUT_FLAGS, MOE_FLAGS, TRAIN_FLAGS, add_training_flags,
                              configured, given_flags, require_at_least, resolve_device)
from moekit.cli.output_folder import writable_folder
from moekit.errors import UsageError

HELP = "train an MoE preset and dense: equal steps and equal time, several seeds"
_PLAN_FLAGS = ("seeds", "lrs", "sweep_steps", "timing_repeats", "moe_preset", "dtype")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.lm.presets import PRESETS

    parser.add_argument("--out", help="folder of the comparison (default runs/compare-<timestamp>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the comparison in DIR")
    parser.add_argument("--moe-preset", default=None, choices=[p for p in PRESETS if p != "dense"],
                        help="the MoE side (default tiny)")
    parser.add_argument("--seeds", type=int,
                        help="runs per side, seeds --seed, --seed + 1, ... (default 3, from 0)")
    parser.add_argument("--lrs", type=float, nargs="+",
                        help="learning rates to choose from on the tuning half, the same grid for "
                             "both sides (default: the preset's lr alone, no sweep)")
    parser.add_argument("--sweep-steps", type=int, help="steps of each sweep run (default steps / 4)")
    parser.add_argument("--timing-repeats", type=int,
                        help="interleaved rounds timing one step of each side (default 10)")
    add_training_flags(parser)


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.lm.comparison import read_plan, run_comparison, start_comparison, summary_table
    from moekit.lm.data import load_corpus

    device = resolve_device(args.device)
    if args.resume:
        given = [f"--{name.replace('_', '-')}" for name in
                 (*TRAIN_FLAGS, *MOE_FLAGS, *LAYOUT_FLAGS, *_PLAN_FLAGS, "data", "out")
                 if getattr(args, name, None) is not None]
        if given:
            raise UsageError(f"--resume continues {args.resume} with its stored plan; drop "
                             f"{', '.join(given)}")
        folder = Path(args.resume)
        plan = read_plan(folder)
    else:
        plan = _plan(args)
        folder = writable_folder(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
        start_comparison(folder, plan)
    corpus = load_corpus(plan.data, plan.train.seq_len)
    try:
        summary = run_comparison(folder, corpus, device=device, progress=not args.no_progress, log=log)
    except KeyboardInterrupt as stopped:  # moekit.lm.signals.TrainingStopped: a run saved its step
        stopped.args = (f"{stopped}; the comparison continues with `moekit compare --resume {folder}`",)
        raise
    log("\n" + summary_table(summary))
    log(f"\ncomparison in {folder} (summary.json, compare.png)")
    return 0


def _plan(args: argparse.Namespace):
    from moekit.lm.comparison import ComparisonPlan

    require_at_least("--seeds", args.seeds, 1, "give how many seeds each side trains")
    require_at_least("--sweep-steps", args.sweep_steps, 1, "give the steps of each sweep run")
    require_at_least("--timing-repeats", args.timing_repeats, 1, "give the timing rounds")
    moe_name = args.moe_preset or "tiny"
    moe_model, train_cfg = configured(args, moe_name)
    dense_args = argparse.Namespace(**{**vars(args), **dict.fromkeys((*MOE_FLAGS, *LAYOUT_FLAGS))})
    dense_model, _ = configured(dense_args, "dense")  # the same training flags
    if given_flags(args, ("eval_every",)) == {}:  # curves fine enough to read a speedup from
        train_cfg = dataclasses.replace(train_cfg, eval_every=max(1, train_cfg.steps // 10))
    lrs = tuple(args.lrs) if args.lrs else (train_cfg.lr,)
    first_seed = args.seed or 0
    seeds = tuple(range(first_seed, first_seed + (args.seeds or 3)))
    data = None if args.data is None else str(Path(args.data).expanduser().absolute())
    try:
        return ComparisonPlan(moe_name, moe_model, dense_model, train_cfg, seeds=seeds, lrs=lrs,
                              sweep_steps=args.sweep_steps or max(1, train_cfg.steps // 4),
                              timing_repeats=args.timing_repeats or 10, data=data,
                              dtype=args.dtype or "float32")
    except ValueError as error:
        raise UsageError(str(error)) from error
