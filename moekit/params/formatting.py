"""A ``ParamBreakdown`` as an aligned plain-text table (what ``moekit params`` prints)."""

from __future__ import annotations

from moekit.params.counting import ParamBreakdown


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
