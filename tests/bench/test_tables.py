"""The moekit bench report at a tiny shape: its rows and the decode bound (no timing assertions)."""

from __future__ import annotations

from moekit import bench


def test_moe_speed_runs_at_a_tiny_shape():
    tiny = bench.Shape("tiny", tokens=16, dim=32, expert_dim=16, num_experts=4, top_k=2)
    report = bench.main([], repeats=1, compile_rows=False, custom=tiny)
    assert "| moekit dropless (backend fused) |" in report
    assert "| naive per-expert loop |" in report
    assert "weight-streaming bound" in report  # small token counts get the decode bound
    assert "| bound: read the touched weights once (sum) (0 MiB) |" in report
    bound_line = next(line for line in report.splitlines() if line.startswith("| bound:"))
    assert bound_line.endswith("| 1.00 | — | — | — |")  # forward only, the streaming ratio's base
    assert "skinny decode kernel o" in report
