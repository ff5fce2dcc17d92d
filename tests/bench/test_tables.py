"""The moekit bench report at a tiny shape: its rows and the decode bound (no timing assertions)."""

from __future__ import annotations

from moekit import bench
from moekit.experts.cpu.isa import cpu_isa


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
    assert f"CPU {cpu_isa().describe()}" in report.splitlines()[0]
    for dtype in ("bfloat16", "float16"):  # the half-weight decode rows
        assert f"| moekit {dtype} expert weights (float32 x and y; goal: at most 0.6x" in report
    if cpu_isa().native_bf16:  # the bf16 row is held to a bf16 limit
        assert "| limit: one chain, bfloat16 |" in report and "vs the bf16 limit" in report
        cells = [line.split(" | ") for line in report.splitlines()
                 if line.startswith("| limit:") and "bfloat16" in line]
        assert "1.00" in {c[2] for c in cells} and "1.00" in {c[5] for c in cells}  # own limit
    else:
        assert "bfloat16 |" not in report.split("| moekit bf16")[0]


def test_isolated_report_says_so_and_keeps_every_row():
    tiny = bench.Shape("tiny", tokens=16, dim=32, expert_dim=16, num_experts=4, top_k=2)
    report = bench.main([], repeats=1, compile_rows=False, custom=tiny, isolated=True)
    assert "every row timed alone beside the limit rows" in report.splitlines()[0]
    assert "| moekit dropless (backend fused) |" in report and "| naive per-expert loop |" in report
