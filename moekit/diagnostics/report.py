"""The routing report: LayerStats of every MoE layer as one JSON-ready dict, and its
terminal rendering (rich, imported only when rendering)."""

from __future__ import annotations

import math
from collections.abc import Callable

from moekit.diagnostics.stats import LayerStats, routing_stability


def build_report(layers: dict[str, LayerStats], against: dict[str, LayerStats] | None = None,
                 top_tokens: int = 3, **info) -> dict:
    """{**info, "layers": {name: LayerStats.summary() + top1_changed}}. top1_changed
    is routing_stability against the same layer of ``against`` (another model
    run over the same tokens with keep_top1), or None."""
    report = dict(info)
    report["layers"] = {}
    for name, stats in layers.items():
        summary = stats.summary(top_tokens)
        summary["top1_changed"] = None if against is None else routing_stability(against[name], stats)
        report["layers"][name] = summary
    return report


def byte_token(token: int) -> str:
    """A readable form of a byte-level token id: the ASCII character, or its escape."""
    char = chr(token)
    readable = token < 128 and (char.isprintable() or char in "\t\n\r")
    return repr(char)[1:-1] if readable else f"\\x{token:02x}"


def top_pairs(coactivation: list[list[float]], count: int = 3) -> list[tuple[int, int, float, float]]:
    """The ``count`` expert pairs (i < j) chosen together most often: (i, j, rate, lift)
    with rate the fraction of tokens choosing both and lift = rate / (rate_i * rate_j)."""
    n = len(coactivation)
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            rate = coactivation[i][j]
            expected = coactivation[i][i] * coactivation[j][j]
            pairs.append((i, j, rate, rate / expected if expected else math.nan))
    return sorted(pairs, key=lambda p: -p[2])[:count]


def render_report(report: dict, console=None,
                  token_text: Callable[[int], str] = byte_token) -> None:
    """Print the report as rich tables: a summary per layer, the load of every
    expert, the most frequent co-activated pairs, and the specialisation table."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError as error:
        raise ImportError("the routing report needs rich: pip install rich") from error
    console = console or Console()
    layers = report["layers"]
    summary = Table(title="Routing per MoE layer")
    for column in ("layer", "tokens", "load max/mean", "load CV", "router entropy (max)",
                   "dropped", "top-1 changed"):
        summary.add_column(column, justify="left" if column == "layer" else "right")
    for name, s in layers.items():
        changed = "-" if s["top1_changed"] is None else f"{s['top1_changed']:.1%}"
        summary.add_row(name, f"{s['tokens']:,}", f"{s['load_max_over_mean']:.2f}", f"{s['load_cv']:.2f}",
                        f"{s['router_entropy']:.2f} ({s['max_router_entropy']:.2f})",
                        f"{s['dropped_fraction']:.1%}", changed)
    console.print(summary)

    num_experts = max(len(s["tokens_per_expert"]) for s in layers.values())
    loads = Table(title="Share of the processed assignments per expert (%)")
    loads.add_column("layer")
    for e in range(num_experts):
        loads.add_column(str(e), justify="right")
    for name, s in layers.items():
        total = max(sum(s["tokens_per_expert"]), 1)
        loads.add_row(name, *(f"{100 * c / total:.1f}" for c in s["tokens_per_expert"]))
    console.print(loads)

    pairs = Table(title="Experts most often chosen together")
    for column in ("layer", "pair", "tokens choosing both", "lift over independent"):
        pairs.add_column(column, justify="left" if column in ("layer", "pair") else "right")
    for name, s in layers.items():
        for i, j, rate, lift in top_pairs(s["coactivation"]):
            pairs.add_row(name, f"{i} & {j}", f"{rate:.1%}", f"{lift:.2f}")
    if pairs.row_count:
        console.print(pairs)

    special = Table(title="Specialisation: what each expert prefers (lift over the overall share)")
    for column in ("layer", "expert", "assignments", "byte class (share, lift)", "tokens (lift)"):
        special.add_column(column, justify="right" if column == "assignments" else "left")
    for name, s in layers.items():
        for entry in s.get("specialisation", []):
            klass = f"{entry['top_class']} ({entry['class_share']:.0%}, {entry['class_lift']:.1f}x)" \
                if "top_class" in entry else "-"
            tokens = ", ".join(f"{token_text(v)!s} ({lift:.1f}x)" for v, _, lift in entry["top_tokens"])
            special.add_row(name, str(entry["expert"]), f"{entry['assignments']:,}", klass, tokens)
    if special.row_count:
        console.print(special)
