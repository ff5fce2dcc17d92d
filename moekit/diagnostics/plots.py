"""PNG plots of a routing report (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

LOAD_HEATMAP = "routing_load.png"
COACTIVATION_PLOT = "routing_coactivation.png"
SPECIALISATION_PLOT = "routing_specialisation.png"


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write routing_load.png (share of the processed assignments, layer x expert),
    routing_coactivation.png (per layer, the fraction of tokens choosing both
    experts i and j) and, when the report has class lifts (and ``class_names``),
    routing_specialisation.png into out_dir. Returns the files; [] without matplotlib."""
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
    written = [out_dir / LOAD_HEATMAP, out_dir / COACTIVATION_PLOT]
    if "class_names" in report and all("class_lift" in s for s in layers):
        written.append(_plot_specialisation(plt, names, layers, report["class_names"], out_dir))
    return written


def _plot_specialisation(plt, names: list[str], layers: list[dict], classes: list[str],
                         out_dir: Path) -> Path:
    """Per layer, expert x class: log2 of the lift (red: the expert takes more of the class
    than its share, blue: less); each class labelled with its share of the layer's assignments."""
    import math

    fig, axes = plt.subplots(1, len(names), figsize=(0.55 * len(classes) * len(names) + 2.5,
                                                     0.3 * len(layers[0]["class_lift"]) + 2.5),
                             squeeze=False)
    for ax, name, s in zip(axes[0], names, layers):
        log_lift = [[math.log2(v) if v > 0 else -3.0 for v in row] for row in s["class_lift"]]
        image = ax.imshow(log_lift, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3)
        ax.set(title=name, xticks=range(len(classes)), ylabel="expert")
        shares = s.get("class_share")
        ax.set_xticklabels(classes if shares is None else
                           [f"{c} ({share:.1%})" for c, share in zip(classes, shares)],
                           rotation=60, ha="right")
    fig.colorbar(image, ax=list(axes[0]), label="log2 lift (share of the class vs overall)")
    fig.suptitle("what each expert takes: byte classes in context")
    fig.savefig(out_dir / SPECIALISATION_PLOT, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_dir / SPECIALISATION_PLOT
