"""Benchmark scripts run at small sizes, so they cannot rot (no timing assertions)."""

from __future__ import annotations

from benchmarks import routing_balance


def test_routing_balance_runs():
    report = routing_balance.main(num_tokens=64, gap_cases=3)
    for name in routing_balance.ROUTERS:
        assert f"| {name} | isotropic |" in report
    assert "| cycle cancelling to convergence |" in report
