"""Routing options in the language model against the default recipe: validation loss, load, tokens/s.

Run: python benchmarks/routing_lm.py [--out runs/routing-lm] [--seeds 0 1 2] [--jobs 2]
         [--variants default expert_threshold null4 batch_invariant] [--repeats 10]
         [--train-flags --steps 40 ...]

Each variant is `moekit train --preset tiny --seed S` plus its flags (VARIANTS), trained once per
seed into <out>/<variant>-s<seed>: a finished run (its last evaluation at its last step) is
read, not retrained, and an unfinished one resumes. --jobs runs train at once, each with
--threads threads (1 by default, so two jobs fill two cores; every run of a table uses the
same thread count, which moves losses in the third decimal). Then the training step of every
variant's trained seed-0 model, on one batch of validation windows, is timed round-robin
(median of --repeats rounds, moekit.lm.step_timing), with all of the machine's threads: run
it on an otherwise idle machine. The table, per variant over the seeds:

- final validation loss: mean, and min-max over seeds; its difference to the default's mean;
- load max/mean: each MoE layer's busiest expert over the mean (real experts), averaged over
  the layers and the last 100 logged steps, then over seeds;
- real experts per token: routed assignments to real experts per token over the last 100
  steps (k exactly for top-k; variable for expert_threshold and null experts);
- null share: the share of assignments that went to null experts (null experts only);
- tokens/s of the timed step and its ratio to the default's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moekit.lm.checkpoint import load_run_model, read_run_config
from moekit.lm.data import evaluation_batches, load_corpus
from moekit.lm.metrics_file import read_records
from moekit.lm.step_timing import model_training_step, round_robin_seconds

VARIANTS = {
    "default": [],
    "expert_threshold": ["--router", "expert_threshold"],
    "null4": ["--num-null-experts", "4"],
    "batch_invariant": ["--batch-invariant"],
}
WINDOW_STEPS = 100  # load and experts per token over the last this many steps


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / f"{variant}-s{seed}"


def finished(folder: Path) -> bool:
    """True when the run's last evaluation is at its last step."""
    if not (folder / "metrics.jsonl").is_file():
        return False
    _, train_cfg, _ = read_run_config(folder)
    records, _ = read_records(folder / "metrics.jsonl")
    return any(r["kind"] == "eval" and r["step"] == train_cfg.steps for r in records)


def train(out: Path, variant: str, seed: int, threads: int, extra: list[str]) -> Path:
    """Train (or resume, or leave alone when finished) one run; its log goes to <run>.log."""
    folder = run_dir(out, variant, seed)
    if finished(folder):
        return folder
    where = ["--resume", str(folder)] if (folder / "config.json").is_file() else \
        ["--out", str(folder), "--preset", "tiny", "--seed", str(seed), *VARIANTS[variant], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(f"{folder}.log", "a") as log:
        subprocess.run([sys.executable, "-m", "moekit", "train", "--no-progress", *where],
                       stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return folder


def run_summary(folder: Path) -> dict[str, float]:
    """Final validation loss, and load max/mean, real experts per token and null share over
    the last WINDOW_STEPS steps of one finished run."""
    _, train_cfg, _ = read_run_config(folder)
    records, _ = read_records(folder / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    logged = [r for r in records if r["kind"] == "train"]
    steps = [0] + [r["step"] for r in logged]
    last = [(r, step - before) for r, step, before in zip(logged, steps[1:], steps)
            if r["step"] > train_cfg.steps - WINDOW_STEPS]
    assignments = sum(sum(map(sum, r["tokens_per_expert"])) for r, _ in last)
    layers = len(last[0][0]["tokens_per_expert"])
    tokens = sum(n for _, n in last) * train_cfg.tokens_per_step * layers
    summary = {"val_loss": evals[-1]["val_loss"],
               "load": statistics.mean(x for r, _ in last for x in r["load_max_over_mean"]),
               "experts_per_token": assignments / tokens}
    if "null_fraction" in last[0][0]:
        summary["null_share"] = statistics.mean(r["null_fraction"] for r, _ in last)
    return summary


def tokens_per_second(folders: dict[str, Path], repeats: int) -> dict[str, float]:
    """Tokens/s of each trained model's training step on one batch of validation windows."""
    steps = {}
    for name, folder in folders.items():
        model_cfg, train_cfg, extra = read_run_config(folder)
        corpus = load_corpus(extra.get("data"), train_cfg.seq_len)
        inputs, targets = evaluation_batches(corpus.val, 1, train_cfg.batch_size, train_cfg.seq_len)[0]
        tokens = torch.cat((inputs, targets[:, -1:]), dim=1)
        steps[name] = model_training_step(load_run_model(folder), train_cfg, tokens)
    seconds = round_robin_seconds(steps, repeats)
    return {name: read_run_config(folders[name])[1].tokens_per_step / seconds[name] for name in steps}


def table(summaries: dict[str, list[dict[str, float]]], rates: dict[str, float]) -> str:
    """The markdown table of the module docstring (summaries[variant]: run_summary per seed)."""
    def mean(variant: str, key: str) -> float:
        return statistics.mean(s[key] for s in summaries[variant])

    lines = ["| variant | seeds | val loss (nats/byte), mean (min-max) | vs default | load max/mean "
             "| real experts per token | null share | tokens/s | vs default |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, runs in summaries.items():
        losses = [s["val_loss"] for s in runs]
        null = f"{mean(variant, 'null_share'):.1%}" if "null_share" in runs[0] else "-"
        rate = f"{rates[variant]:.0f} | {rates[variant] / rates['default']:.2f}" if rates else "- | -"
        lines.append(f"| {variant} | {len(runs)} | {statistics.mean(losses):.4f} ({min(losses):.4f}-"
                     f"{max(losses):.4f}) | {statistics.mean(losses) - mean('default', 'val_loss'):+.4f} "
                     f"| {mean(variant, 'load'):.2f} | {mean(variant, 'experts_per_token'):.2f} | "
                     f"{null} | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/routing-lm"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="threads per training run")
    parser.add_argument("--repeats", type=int, default=10, help="rounds of the step timing (0: none)")
    parser.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                        help="more `moekit train` flags for every run (e.g. a short smoke budget)")
    args = parser.parse_args(argv)
    if "default" not in args.variants:
        args.variants = ["default", *args.variants]
    if args.jobs < 1 or args.threads < 1 or args.repeats < 0:
        parser.error(f"--jobs and --threads must be >= 1 and --repeats >= 0, got {args.jobs}, "
                     f"{args.threads}, {args.repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = [(variant, seed) for seed in args.seeds for variant in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(pool.map(lambda vs: train(args.out, *vs, args.threads, args.train_flags), work))
    summaries = {variant: [] for variant in args.variants}
    for (variant, _), folder in zip(work, folders):
        summaries[variant].append(run_summary(folder))
    rates = {} if args.repeats == 0 else tokens_per_second(
        {variant: run_dir(args.out, variant, args.seeds[0]) for variant in args.variants}, args.repeats)
    report = (f"tiny preset, seeds {args.seeds}, {args.threads} thread(s) per run; step timing with "
              f"{torch.get_num_threads()} threads, {args.repeats} rounds\n\n" + table(summaries, rates))
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
