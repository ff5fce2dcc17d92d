"""PNG plots of a routing report (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

LOAD_HEATMAP = "routing_load.png"
COACTIVATION_PLOT = "routing_coactivation.png"


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write routing_load.png (share of the processed assignments, layer x expert)
    and routing_coactivation.png (per layer, the fraction of tokens choosing both
    experts i and j) into out_dir. Returns the files; [] without matplotlib."""
    from moekit.lm.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    names = list(report["layers"])
    layers = [report["layers"][n] for n in names]
    shares = [[c / max(sum(s["tokens_per_expert"]), 1) for c in s["tokens_per_expert"]] for s in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(shares[0]) + 2), 0.5 * len(names) + 1.8))
    image = ax.imshow(shares, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", yticks=range(len(names)), yticklabels=names,
           title="share of the processed assignments per expert")
    fig.colorbar(image, ax=ax, label="share")
    fig.tight_layout()
    fig.savefig(out_dir / LOAD_HEATMAP, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name, s in zip(axes[0], names, layers):
        image = ax.imshow(s["coactivation"], cmap="magma")
        ax.set(title=name, xlabel="expert j", ylabel="expert i")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("fraction of tokens choosing both experts (diagonal: each expert alone)")
    fig.tight_layout()
    fig.savefig(out_dir / COACTIVATION_PLOT, dpi=120)
    plt.close(fig)
    return [out_dir / LOAD_HEATMAP, out_dir / COACTIVATION_PLOT]
