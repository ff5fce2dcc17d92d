"""``moekit inspect``: routing diagnostics of a trained run on its validation data,
compared with an earlier checkpoint or other weights (docs/diagnostics.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.cli.flags import resolve_device
from moekit.cli.output_folder import writable_folder
from moekit.errors import UsageError

HELP = "routing diagnostics of a trained run on its validation data (docs/diagnostics.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder written by `moekit train`")
    parser.add_argument("--against", metavar="PATH",
                        help="weights to compare top-1 experts with: a checkpoint or run folder, or a "
                             ".safetensors file (default: the run's previous checkpoint, if any)")
    parser.add_argument("--data", help="text to route (default: the run's own data)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="default: the run's training seq_len")
    parser.add_argument("--out", help="folder for inspect.json and the plots (default RUN/inspect)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace, log=print) -> int:
    from moekit.diagnostics import (TEXT_CLASSES, build_report, collect_routing_stats, plot_report,
                                    render_report, text_classes)
    from moekit.lm.checkpoint import (checkpoint_dirs, load_run_model, load_weights, read_run_config,
                                      weights_file)
    from moekit.lm.data import evaluation_batches, load_corpus

    run_dir, device = Path(args.run), resolve_device(args.device)
    model_cfg, train_cfg, extra = read_run_config(run_dir)
    if model_cfg.moe is None:
        raise UsageError(f"{run_dir} is a dense model: it has no MoE layer to inspect")
    seq_len = args.seq_len or train_cfg.seq_len
    for name in ("batches", "batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = writable_folder(args.out if args.out else run_dir / "inspect")
    corpus = load_corpus(args.data if args.data is not None else extra.get("data"), seq_len)
    batches = [inputs.to(device) for inputs, _ in
               evaluation_batches(corpus.val, args.batches, args.batch_size, seq_len)]
    model = load_run_model(run_dir, device)
    layers = collect_routing_stats(model, batches, model_cfg.vocab_size, keep_top1=True,
                                   classes_of=text_classes, num_classes=len(TEXT_CLASSES))
    earlier = checkpoint_dirs(run_dir)[-2:-1]
    against_path = weights_file(Path(args.against)) if args.against else \
        (weights_file(earlier[0]) if earlier else None)
    against = None
    if against_path is not None:
        load_weights(model, against_path)
        against = collect_routing_stats(model, batches, keep_top1=True)
    report = build_report(layers, against, run=str(run_dir), data=corpus.source,
                          compared_with=None if against_path is None else str(against_path),
                          class_names=list(TEXT_CLASSES))
    render_report(report)
    (out / "inspect.json").write_text(json.dumps(report, indent=1) + "\n")
    plots = plot_report(report, out)
    if not plots:
        log("plots skipped: matplotlib is not installed (pip install 'moekit[plot]')")
    log(f"report: {out / 'inspect.json'}" + "".join(f", {p}" for p in plots))
    return 0
