"""Plots of a run's metrics.jsonl (matplotlib, an optional extra: ``pip install moekit[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import METRICS_FILE
from .metrics_file import read_records

LOSS_PLOT = "loss.png"
LOAD_PLOT = "expert_load.png"


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a run, in step order; a partial last
    line (an interrupted write) is skipped."""
    records, _ = read_records(Path(run_dir) / METRICS_FILE)
    return ([r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"])


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (train and validation loss) and, for MoE models,
    expert_load.png (per MoE layer: each expert's share of the routed tokens
    over training) into the run folder. Returns the files written; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title=run_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / LOSS_PLOT, dpi=120)
    plt.close(fig)
    written.append(run_dir / LOSS_PLOT)

    layers = len(train[0]["tokens_per_expert"]) if train else 0
    if layers:
        fig, axes = plt.subplots(layers, 1, figsize=(8, 1.6 * layers + 0.8), sharex=True, squeeze=False)
        steps = [r["step"] for r in train]
        for layer, ax in enumerate(axes[:, 0]):
            counts = [r["tokens_per_expert"][layer] for r in train]
            shares = [[c / max(sum(row), 1) for c in row] for row in counts]
            image = ax.imshow(list(zip(*shares)), aspect="auto", origin="lower", cmap="viridis",
                              extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, len(shares[0]) - 0.5))
            ax.set_ylabel(f"MoE {layer}\nexpert")
            fig.colorbar(image, ax=ax, label="share")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("tokens per expert over training")
        fig.tight_layout()
        fig.savefig(run_dir / LOAD_PLOT, dpi=120)
        plt.close(fig)
        written.append(run_dir / LOAD_PLOT)
    return written


def plot_comparison(curves: dict[str, list[list[tuple[int, float]]]], seconds_per_step: dict[str, float],
                    path: Path) -> Path | None:
    """Validation loss against steps and against seconds (steps times each run's seconds per
    step): per named side, the mean over its runs' curves [(step, loss)] with the min-max band
    where they share evaluation steps; None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, runs in curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
        per_step = [[dict(run)[s] for run in runs] for s in steps]
        mean = [sum(values) / len(values) for values in per_step]
        for ax, scale in ((by_step, 1.0), (by_time, seconds_per_step[name])):
            x = [s * scale for s in steps]
            ax.plot(x, mean, "o-", markersize=3, label=f"{name} ({len(runs)} runs)")
            ax.fill_between(x, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    by_step.set(xlabel="step", ylabel="validation loss (nats/byte)")
    by_time.set(xlabel="seconds (steps x median seconds per step)")
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
