"""``moekit compare``: train an MoE preset and the dense one on the same budget, and
print the gap in validation loss and throughput."""

from __future__ import annotations

import argparse
import time

from moekit.cli.flags import (DTYPES, LAYOUT_FLAGS, MOE_FLAGS, add_training_flags, configured,
                              resolve_device)
from moekit.cli.output_folder import writable_folder

HELP = "train tiny (MoE) and dense on the same budget"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.lm.presets import PRESETS

    parser.add_argument("--out", help="folder for both runs (default runs/compare-<timestamp>)")
    parser.add_argument("--moe-preset", default="tiny", choices=[p for p in PRESETS if p != "dense"])
    add_training_flags(parser)


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.lm.data import load_corpus
    from moekit.lm.plots import plot_validation_curves
    from moekit.lm.train import train

    device, dtype = resolve_device(args.device), DTYPES[args.dtype or "float32"]
    configs = {args.moe_preset: configured(args, args.moe_preset)}
    dense_args = argparse.Namespace(**{**vars(args), **dict.fromkeys((*MOE_FLAGS, *LAYOUT_FLAGS))})
    configs["dense"] = configured(dense_args, "dense")
    out = writable_folder(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    corpus = load_corpus(args.data, max(t.seq_len for _, t in configs.values()))
    results = {}
    for name, (model_cfg, train_cfg) in configs.items():
        log(f"training {name} ...")
        results[name] = train(model_cfg, train_cfg, corpus, out / name, device=device, dtype=dtype,
                              progress=not args.no_progress,
                              extra_config={"preset": name, "data": args.data}, log=log)
    moe_result, dense_result = results[args.moe_preset], results["dense"]
    log("\n| run | validation loss (nats/byte) | tokens/s |\n|---|---|---|")
    for name, result in results.items():
        log(f"| {name} | {result.val_loss:.4f} | {result.tokens_per_second:.0f} |")
    log(f"\n{args.moe_preset} - dense = {moe_result.val_loss - dense_result.val_loss:+.4f} nats/byte; "
        f"throughput dense/{args.moe_preset} = "
        f"{dense_result.tokens_per_second / max(moe_result.tokens_per_second, 1e-9):.2f}x; "
        f"unigram baseline {moe_result.unigram_loss:.4f}")
    plot = plot_validation_curves({n: r.run_dir for n, r in results.items()}, out / "compare.png")
    log(f"runs in {out}" + (f", plot {plot}" if plot else ""))
    return 0
