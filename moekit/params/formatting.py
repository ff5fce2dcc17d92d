"""What ``moekit params`` prints: a ``ParamBreakdown`` as an aligned plain-text table
(``format_breakdown``), and the count of a transformers model (``format_hf_count``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from moekit.params.counting import ParamBreakdown

if TYPE_CHECKING:
    from moekit.params.hf_config import HFModelCount


def _human(n: int, units: tuple[str, ...] = ("", "K", "M", "B", "T")) -> str:
    """1234567 -> '1.23M': two decimals in the largest unit not above n; below 1000 as is."""
    power = 0
    while power + 1 < len(units) and n >= 1000 ** (power + 1):
        power += 1
    return str(n) if power == 0 else f"{n / 1000 ** power:.2f}{units[power]}"


def format_breakdown(breakdown: ParamBreakdown) -> str:
    """An aligned plain-text table: category, total, share of total, active, share
    of active; then the active fraction and the FLOPs per token."""
    total, active = breakdown.total, breakdown.active
    rows = [(name.replace("_", " "), c.total, c.active)
            for name, c in breakdown.categories().items() if c.total]
    rows.append(("total", total, active))
    title = breakdown.name or "model"
    width = max(len(title), *(len(row[0]) for row in rows))
    lines = [f"{title:<{width}}  {'total':>9} {'%':>6}  {'active':>9} {'%':>6}"]
    for label, t, a in rows:
        if label == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<{width}}  {_human(t):>9} {100 * t / total:>5.1f}%  "
                     f"{_human(a):>9} {100 * a / active:>5.1f}%")
    flops = ("", "K", "M", "G", "T", "P")
    lines.append(f"active per token: {100 * active / total:.1f}% of parameters")
    lines.append(f"FLOPs per token at context {breakdown.context_length}: "
                 f"forward {_human(breakdown.forward_flops_per_token, flops)}FLOP, "
                 f"training (x3) {_human(breakdown.training_flops_per_token, flops)}FLOP")
    return "\n".join(lines)


def format_hf_count(count: HFModelCount) -> str:
    """Total, active and routed-expert parameters, exact and rounded, then the MoE
    layers grouped by experts, expert size and k."""
    lines = [f"{count.name} (model_type {count.model_type}, built on the meta device)"]
    for label, n in (("total", count.total), ("active", count.active),
                     ("routed experts", count.routed_experts)):
        if n is None:
            lines.append(f"{label:<14}  undefined: the experts or k of a MoE layer are unknown")
        else:
            lines.append(f"{label:<14}  {n:>19,}  {_human(n):>8}  {100 * n / count.total:5.1f}%")
    groups = Counter((layer.num_experts, layer.expert_params, layer.top_k)
                     for layer in count.moe_layers)
    for (experts, size, k), layers in groups.items():
        if experts is None:
            lines.append(f"{layers} MoE layers whose experts cannot be told apart")
        else:
            lines.append(f"{layers} MoE layers of {experts} experts of {_human(size)}, "
                         f"{'top-' + str(k) if k else 'k unknown'}")
    return "\n".join(lines)
