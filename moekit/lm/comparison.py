"""MoE against dense at equal active parameters: equal steps, equal time, several seeds.

A comparison lives in one folder and runs in stages, each saved as it ends, so an
interrupted comparison continues where it stopped (``run_comparison(folder)`` again):

1. ``timing.json``: the median seconds of one optimizer step of each side, timed
   interleaved (moekit.lm.step_timing), so that load from other processes slows both
   alike. Equal time gives dense ``round(steps * moe_seconds / dense_seconds)`` steps
   with its own full schedule, and the loss-against-seconds curves use these figures.
2. ``sweep/``: with more than one learning rate, each side trains seed 0 for
   ``sweep_steps`` at every rate and keeps the rate with the lowest loss on the
   validation split's *tuning* half (the same grid and rule for both sides).
3. ``runs/``: for every seed, the MoE model, dense at equal steps and dense at equal
   time, each at its chosen rate, scored on the validation split's *test* half, which
   no choice has seen (moekit.lm.data.Corpus.held_out_halves).

Each run's ``result.json`` marks it done; a run with a checkpoint resumes; a run
folder with neither (stopped before its first checkpoint) starts again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .checkpoint import atomic_write_text, checkpoint_dirs
from .config import LMConfig, TrainConfig
from .data import Corpus
from .plots import plot_comparison, read_metrics
from .step_timing import median_step_seconds
from .train import train

PLAN_FILE, TIMING_FILE, SWEEP_FILE, RESULT_FILE = "compare.json", "timing.json", "sweep.json", "result.json"
SUMMARY_FILE, PLOT_FILE = "summary.json", "compare.png"
SIDES = ("moe", "dense_steps", "dense_time")  # the runs of every seed


@dataclass(frozen=True)
class ComparisonPlan:
    """What a comparison trains: ``moe`` and ``dense`` models on ``train`` (whose lr and
    seed the comparison sets), over ``seeds``, with learning rates chosen from ``lrs``
    by runs of ``sweep_steps`` (no sweep for one rate)."""

    moe_name: str
    moe: LMConfig
    dense: LMConfig
    train: TrainConfig
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (3e-3,)
    sweep_steps: int = 250
    timing_repeats: int = 10
    data: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.moe.moe is None or self.dense.moe is not None:
            raise ValueError("a comparison needs an MoE model (moe) and a dense one (dense)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds}")
        if not self.lrs or min(self.lrs) <= 0 or len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"lrs must be distinct learning rates > 0, got {self.lrs}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("sweep_steps", "timing_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.update(moe=self.moe.to_dict(), dense=self.dense.to_dict(), train=self.train.to_dict())
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ComparisonPlan:
        values = dict(values)
        values.update(moe=LMConfig.from_dict(values["moe"]), dense=LMConfig.from_dict(values["dense"]),
                      train=TrainConfig.from_dict(values["train"]), seeds=tuple(values["seeds"]),
                      lrs=tuple(values["lrs"]))
        return cls(**values)


@dataclass
class RunResult:
    """One finished run: its final loss on its evaluation split, the evaluation curve
    [(step, loss)], and the mean tokens/s it trained at (over its own calls of train)."""

    name: str
    steps: int
    lr: float
    val_loss: float
    curve: list[tuple[int, float]]
    tokens_per_second: float


def start_comparison(folder: Path, plan: ComparisonPlan) -> None:
    """Write the plan into a new (or empty) folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise UsageError(f"output folder {folder} exists and is not empty; choose another --out "
                         "or continue it with --resume")
    atomic_write_text(folder / PLAN_FILE, json.dumps(plan.to_dict(), indent=2))


def read_plan(folder: Path) -> ComparisonPlan:
    path = folder / PLAN_FILE
    if not path.is_file():
        raise UsageError(f"{folder} is not a comparison folder (no {PLAN_FILE})")
    try:
        return ComparisonPlan.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path} is not a readable comparison plan: {error}") from error


def run_comparison(folder: Path, corpus: Corpus, *, device: torch.device | str = "cpu",
                   progress: bool = True, log: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    """Run (or continue) every stage of the comparison in ``folder``; write and return the
    summary (see ``summarize``), and plot the curves against steps and seconds (with
    matplotlib)."""
    plan = read_plan(folder)
    dtype = getattr(torch, plan.dtype)
    tune, test = corpus.held_out_halves(plan.train.seq_len)
    seconds = _step_seconds(folder, plan, device, dtype, log)
    models = {"moe": plan.moe, "dense": plan.dense}

    def run(name: str, model: LMConfig, train_cfg: TrainConfig, split: Corpus) -> RunResult:
        return finished_run(folder / name, name, model, train_cfg, split, device=device,
                             dtype=dtype, progress=progress, log=log,
                             extra={"compare": str(folder), "data": plan.data})

    lrs = _chosen_rates(folder, plan, models, tune, run, log)
    time_steps = max(1, round(plan.train.steps * seconds["moe"] / seconds["dense"]))
    results: dict[str, list[RunResult]] = {side: [] for side in SIDES}
    for seed in plan.seeds:
        for side in SIDES:
            model_side = "moe" if side == "moe" else "dense"
            steps = time_steps if side == "dense_time" else plan.train.steps
            cfg = dataclasses.replace(plan.train, seed=seed, lr=lrs[model_side], steps=steps)
            results[side].append(run(f"runs/{side}-seed{seed}", models[model_side], cfg, test))
    summary = summarize(results, seconds, plan)
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2))
    curves = {side: [r.curve for r in runs] for side, runs in results.items()}
    seconds_by_side = {side: seconds["moe" if side == "moe" else "dense"] for side in SIDES}
    plot_comparison(curves, seconds_by_side, folder / PLOT_FILE)
    return summary


def _step_seconds(folder: Path, plan: ComparisonPlan, device, dtype, log) -> dict[str, float]:
    path = folder / TIMING_FILE
    if path.is_file():
        return json.loads(path.read_text())["seconds_per_step"]
    log(f"timing one optimizer step of each model ({plan.timing_repeats} interleaved rounds) ...")
    seconds = median_step_seconds({"moe": (plan.moe, plan.train), "dense": (plan.dense, plan.train)},
                                  plan.timing_repeats, device, dtype)
    atomic_write_text(path, json.dumps({"seconds_per_step": seconds,
                                        "threads": torch.get_num_threads()}, indent=2))
    return seconds


def _chosen_rates(folder: Path, plan: ComparisonPlan, models: dict[str, LMConfig], tune: Corpus,
                  run, log) -> dict[str, float]:
    """{"moe": lr, "dense": lr}: the one rate, or the sweep's best on the tuning half."""
    if len(plan.lrs) == 1:
        return dict.fromkeys(models, plan.lrs[0])
    path = folder / SWEEP_FILE
    if path.is_file():
        return json.loads(path.read_text())["chosen"]
    losses: dict[str, dict[float, float]] = {}
    for side, model in models.items():
        for lr in plan.lrs:
            cfg = dataclasses.replace(plan.train, seed=plan.seeds[0], lr=lr, steps=plan.sweep_steps)
            losses.setdefault(side, {})[lr] = run(f"sweep/{side}-lr{lr:g}", model, cfg, tune).val_loss
    chosen = {side: min(by_lr, key=lambda lr: (math.isnan(by_lr[lr]), by_lr[lr]))
              for side, by_lr in losses.items()}
    log("learning rates chosen on the tuning half: "
        + ", ".join(f"{side} {lr:g}" for side, lr in chosen.items()))
    atomic_write_text(path, json.dumps({"chosen": chosen, "tuning_loss": {
        side: {f"{lr:g}": loss for lr, loss in by_lr.items()} for side, by_lr in losses.items()}},
        indent=2))
    return chosen


def finished_run(run_dir: Path, name: str, model: LMConfig, train_cfg: TrainConfig, corpus: Corpus,
                  *, device, dtype, progress: bool, log, extra: dict) -> RunResult:
    """The run's result: read when done, else trained (resumed from its newest checkpoint)."""
    done = run_dir / RESULT_FILE
    if done.is_file():
        values = json.loads(done.read_text())
        return RunResult(**{**values, "curve": [tuple(point) for point in values["curve"]]})
    resume = run_dir.is_dir() and bool(checkpoint_dirs(run_dir))
    if run_dir.is_dir() and not resume:  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    log(f"{'resuming' if resume else 'training'} {name} (lr {train_cfg.lr:g}, seed {train_cfg.seed}, "
        f"{train_cfg.steps} steps) ...")
    trained = train(model, train_cfg, corpus, run_dir, resume=resume, device=device, dtype=dtype,
                    progress=progress, extra_config=extra, log=log)
    curve = [(r["step"], r["val_loss"]) for r in read_metrics(run_dir)[1]]
    result = RunResult(name, trained.step, train_cfg.lr, trained.val_loss, curve,
                       trained.tokens_per_second)
    atomic_write_text(done, json.dumps(dataclasses.asdict(result), indent=2))
    return result


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which an evaluation curve [(step, loss)] reaches ``target``,
    linearly interpolated between evaluations (from step 0 at +inf); None if never."""
    previous_step, previous_loss = 0, math.inf
    for step, loss in curve:
        if loss <= target:
            if math.isinf(previous_loss):
                return float(step)
            return previous_step + (step - previous_step) * (previous_loss - target) / (previous_loss - loss)
        previous_step, previous_loss = step, loss
    return None


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(results: dict[str, list[RunResult]], seconds: dict[str, float],
              plan: ComparisonPlan) -> dict[str, Any]:
    """Mean and spread over seeds of each side's final test loss, the paired differences
    MoE - dense (equal steps, equal time), and the speedup to dense quality: dense's steps
    (and seconds) over the MoE model's to reach dense's final loss at equal steps."""
    losses = {side: [r.val_loss for r in runs] for side, runs in results.items()}
    speedup_steps, speedup_seconds = [], []
    for moe, dense in zip(results["moe"], results["dense_steps"]):
        reached = steps_to_reach(moe.curve, dense.val_loss)
        if reached is not None and reached > 0:
            speedup_steps.append(dense.steps / reached)
            speedup_seconds.append(dense.steps * seconds["dense"] / (reached * seconds["moe"]))
    return {
        "moe_name": plan.moe_name, "seeds": list(plan.seeds),
        "steps": {side: results[side][0].steps for side in SIDES},
        "lr": {side: results[side][0].lr for side in SIDES},
        "seconds_per_step": seconds,
        "loss": {side: {**spread(values), "per_seed": values} for side, values in losses.items()},
        "moe_minus_dense": {
            basis: spread([m - d for m, d in zip(losses["moe"], losses[side])])
            for basis, side in (("equal_steps", "dense_steps"), ("equal_time", "dense_time"))},
        "speedup_to_dense_quality": {
            "reached": f"{len(speedup_steps)} of {len(plan.seeds)} seeds",
            "steps": spread(speedup_steps) if speedup_steps else None,
            "seconds": spread(speedup_seconds) if speedup_seconds else None},
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table and three lines of differences."""
    name, seconds = summary["moe_name"], summary["seconds_per_step"]
    labels = {"moe": f"{name} (MoE)", "dense_steps": "dense, equal steps", "dense_time": "dense, equal time"}
    lines = [(f"| run | steps | lr | s/step | test loss (nats/byte), mean ± std over "
              f"{len(summary['seeds'])} seeds | per seed |"), "|---|---|---|---|---|---|"]
    for side, label in labels.items():
        loss = summary["loss"][side]
        lines.append(f"| {label} | {summary['steps'][side]} | {summary['lr'][side]:g} | "
                     f"{seconds['moe' if side == 'moe' else 'dense']:.3f} | {loss['mean']:.4f} ± "
                     f"{loss['std']:.4f} | {', '.join(f'{v:.4f}' for v in loss['per_seed'])} |")
    lines.append("")
    for basis, diff in summary["moe_minus_dense"].items():
        lines.append(f"{name} - dense at {basis.replace('_', ' ')}: {diff['mean']:+.4f} ± "
                     f"{diff['std']:.4f} nats/byte (paired by seed; min {diff['min']:+.4f}, "
                     f"max {diff['max']:+.4f})")
    speedup = summary["speedup_to_dense_quality"]
    if speedup["steps"] is None:
        lines.append(f"{name} did not reach dense's final loss (equal steps) in any seed")
    else:
        lines.append(f"{name} reaches dense's final loss {speedup['steps']['mean']:.2f}x sooner in "
                     f"steps and {speedup['seconds']['mean']:.2f}x sooner in seconds "
                     f"({speedup['reached']})")
    return "\n".join(lines)
