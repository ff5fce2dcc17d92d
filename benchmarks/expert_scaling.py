"""What more experts buy: validation loss against the number of experts at fixed active
parameters and compute per token, and the speedup to dense quality.

Run: python benchmarks/expert_scaling.py --out DIR [--seeds S] [--layouts ...] [--steps N]

Every layout is the `tiny` trunk (first block dense, the others MoE, softmax top-k, balance
loss 0.02, no shared expert) with k * expert_dim = 512, the dense FFN's width, so active
parameters and FLOPs per token stay those of `dense` (layout "1x512", E = 1) while total
parameters grow with E. Each run trains at the preset's budget and learning rate (the same
rule for every layout) and is scored on the test half of the validation split
(moekit.lm.data.Corpus.held_out_halves); step times are timed interleaved
(moekit.lm.step_timing). Runs are saved as they finish: the same command continues an
interrupted sweep. Prints a markdown table and writes scaling.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from moekit import MoEConfig
from moekit.lm.comparison import finished_run, spread, steps_to_reach
from moekit.lm.data import load_corpus
from moekit.lm.presets import PRESETS
from moekit.lm.step_timing import median_step_seconds
from moekit.params import count_parameters, spec_from_lm_config

# name: (num_experts, expert_dim, top_k); "1x512" is the dense preset
LAYOUTS = {"1x512": (1, 512, 1), "4x128": (4, 128, 4), "16x128": (16, 128, 4),
           "64x128": (64, 128, 4), "64x64": (64, 64, 8)}


def layout_config(name: str):
    """The LMConfig of a layout (dense for E = 1)."""
    num_experts, expert_dim, top_k = LAYOUTS[name]
    dense = PRESETS["dense"].model
    if num_experts == 1:
        return dense
    moe = MoEConfig(dim=dense.dim, expert_dim=expert_dim, num_experts=num_experts, top_k=top_k,
                    balance_loss_weight=0.02)
    return dataclasses.replace(dense, moe=moe, first_dense_layers=1)


def main(out: Path, layouts: list[str], seeds: int, timing_repeats: int, data: str | None = None,
         progress: bool = False, **train_fields) -> str:
    """train_fields: TrainConfig fields to change from the preset's (steps, batch_size, ...)."""
    train = dataclasses.replace(PRESETS["dense"].train, **train_fields)
    train = dataclasses.replace(train, eval_every=max(1, train.steps // 10))
    models = {name: layout_config(name) for name in layouts}
    out.mkdir(parents=True, exist_ok=True)
    timing_path = out / "timing.json"
    if timing_path.is_file():
        timing = json.loads(timing_path.read_text())
    else:
        timing = {"seconds_per_step": median_step_seconds({n: (m, train) for n, m in models.items()},
                                                          timing_repeats),
                  "threads": torch.get_num_threads()}
        timing_path.write_text(json.dumps(timing, indent=2))
    seconds = timing["seconds_per_step"]
    corpus = load_corpus(data, train.seq_len)
    _, test = corpus.held_out_halves(train.seq_len)
    # trained in the order given (an E = 1 run copied in from a comparison can come last),
    # reported in LAYOUTS order
    results = {name: [finished_run(out / f"{name}-seed{seed}", f"{name} seed {seed}", model,
                                   dataclasses.replace(train, seed=seed), test, device="cpu",
                                   dtype=torch.float32, progress=progress, log=print,
                                   extra={"scaling": name})
                      for seed in range(seeds)]
               for name, model in models.items()}
    results = {name: results[name] for name in LAYOUTS if name in results}
    dense_name = next((n for n in layouts if LAYOUTS[n][0] == 1), None)
    header = (f"{train.steps} steps of {train.tokens_per_step} tokens, lr {train.lr:g}, {seeds} seed(s), "
              f"trained at {torch.get_num_threads()} thread(s), s/step timed at {timing['threads']}; "
              "test-half validation loss in nats/byte")
    columns = ("| layout (E x expert_dim, top-k) | total params | active params | s/step | "
               "loss (mean ± std) | speedup to dense quality, steps / seconds |")
    lines = [header, "", columns, "|---|---|---|---|---|---|"]
    losses = {}
    for name, runs in results.items():
        count = count_parameters(spec_from_lm_config(models[name], name))
        losses[name] = spread([r.val_loss for r in runs])
        speedup = "-"
        if dense_name and name != dense_name:
            ratios = []
            for run, dense in zip(runs, results[dense_name]):
                reached = steps_to_reach(run.curve, dense.val_loss)
                if reached:
                    ratios.append((dense.steps / reached,
                                   dense.steps * seconds[dense_name] / (reached * seconds[name])))
            speedup = (f"{sum(r[0] for r in ratios) / len(ratios):.2f}x / "
                       f"{sum(r[1] for r in ratios) / len(ratios):.2f}x ({len(ratios)} of {seeds})"
                       if ratios else "not reached")
        num_experts, expert_dim, top_k = LAYOUTS[name]
        lines.append(f"| {name} (top-{top_k}) | {count.total / 1e6:.2f}M | {count.active / 1e6:.2f}M | "
                     f"{seconds[name]:.3f} | {losses[name]['mean']:.4f} ± {losses[name]['std']:.4f} | "
                     f"{speedup} |")
    report = "\n".join(lines)
    (out / "scaling.md").write_text(report + "\n")
    _plot(models, losses, out / "scaling.png")
    return report


def _plot(models: dict, losses: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_experts, by_params) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name in losses:  # LAYOUTS order: E grows
        total = count_parameters(spec_from_lm_config(models[name], name)).total
        mean, std = losses[name]["mean"], losses[name]["std"]
        label = f"{name} top-{LAYOUTS[name][2]}" + (" (dense)" if LAYOUTS[name][0] == 1 else "")
        by_experts.errorbar(LAYOUTS[name][0], mean, yerr=std, fmt="o", capsize=3, label=label)
        by_params.errorbar(total / 1e6, mean, yerr=std, fmt="o", capsize=3, label=label)
    by_experts.set(xscale="log", xlabel="experts E (log)", ylabel="validation loss (nats/byte)")
    by_params.set(xscale="log", xlabel="total parameters, millions (log)")
    by_experts.legend()
    fig.suptitle("same active parameters and FLOPs per token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs (continued if present)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, help="default: the preset's budget")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--seq-len", type=int, help="default: the preset's")
    parser.add_argument("--eval-batches", type=int, help="default: the preset's")
    parser.add_argument("--timing-repeats", type=int, default=10)
    parser.add_argument("--data", help="a text file or folder (default: the built-in corpus)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    fields = {name: getattr(args, name) for name in ("steps", "batch_size", "seq_len", "eval_batches")
              if getattr(args, name) is not None}
    print(main(args.out, args.layouts, args.seeds, args.timing_repeats, args.data, args.progress,
               **fields))
