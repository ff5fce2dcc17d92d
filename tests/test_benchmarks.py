"""Benchmark scripts run at small sizes, so they cannot rot (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import routing_balance


def test_routing_balance_runs():
    report = routing_balance.main(num_tokens=64, gap_cases=3)
    for name in routing_balance.ROUTERS:
        assert f"| {name} | isotropic |" in report
    assert "| cycle cancelling to convergence |" in report


def test_moe_speed_runs_at_a_tiny_shape():
    from moekit import bench as moe_speed
    tiny = moe_speed.Shape("tiny", tokens=16, dim=32, expert_dim=16, num_experts=4, top_k=2)
    report = moe_speed.main([], repeats=1, compile_rows=False, custom=tiny)
    assert "| moekit dropless (backend fused) |" in report
    assert "| naive per-expert loop |" in report
    assert "weight-streaming bound" in report  # small token counts get the decode bound
    assert "| bound: read the touched weights once (sum) (0 MiB) |" in report
    bound_line = next(line for line in report.splitlines() if line.startswith("| bound:"))
    assert bound_line.endswith("| 1.00 | — | — | — |")  # forward only, the streaming ratio's base
    assert "skinny decode kernel o" in report


def test_touched_weights_are_the_router_and_the_routed_experts():
    import moekit
    from moekit import bench as moe_speed
    torch.manual_seed(0)
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=4, num_experts=6, top_k=1))
    with torch.no_grad():  # route every token to expert 1 or 4 (logits from the first two dims)
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = moe.router.weight[4, 1] = 1.0
    x = torch.zeros(5, 8)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    weights = moe_speed.touched_weights(moe, x)
    experts = moe.experts
    expected = [moe.router.weight, experts.gate_up_proj[1:2], experts.down_proj[1:2],
                experts.gate_up_proj[4:5], experts.down_proj[4:5]]
    assert len(weights) == len(expected)
    for got, want in zip(weights, expected):
        assert got.data_ptr() == want.data_ptr() and got.shape == want.shape


def test_lm_throughput_runs_at_a_small_batch():
    from benchmarks import lm_throughput
    report = lm_throughput.main(["tiny"], repeats=1, batch_size=2, seq_len=16)
    assert "| tiny |" in report and "| dense | " in report


def test_gpu_moe_refuses_without_cuda(monkeypatch):
    from benchmarks import gpu_moe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"needs an NVIDIA GPU .* nothing was measured"):
        gpu_moe.cli(["--shapes", "S1"])


def test_gpu_moe_tables_build_at_a_tiny_shape_on_cpu():
    """The GPU benchmark's rows and table, on CPU (float32; Triton rows under the
    interpreter when Triton is installed), so the script cannot rot."""
    from benchmarks import gpu_moe
    tiny = gpu_moe.Shape("tiny", tokens=8, dim=16, expert_dim=16, num_experts=2, top_k=2)
    report = gpu_moe.main([], repeats=1, custom=tiny, device="cpu", dtype=torch.float32,
                          warmup=0)
    assert "| dense matmul chain | " in report and "| torch grouped_mm | " in report
    if "Triton not installed" not in report:
        assert "| moekit fused_moe (with counting sort) | " in report
        assert "| moekit MoE layer, backend triton (router and dispatch included) | " in report
        diff = float(report.split("relative difference ")[1].split()[0])
        assert diff < 1e-5


def test_expert_parallel_speed_runs_at_a_tiny_shape():
    from benchmarks import expert_parallel_speed
    from moekit.bench import Shape
    tiny = Shape("tiny", tokens=16, dim=32, expert_dim=16, num_experts=4, top_k=2)
    report = expert_parallel_speed.main(["--world-sizes", "1", "2", "--repeats", "1"], shape=tiny)
    assert "| 1 | 16 |" in report and "| 2 | 8 |" in report and "1.00x" in report


def test_placement_zipf_runs_at_a_small_size():
    from benchmarks import placement_zipf
    report = placement_zipf.main(draws=1, cases=[(8, 2, 0), (8, 2, 2)], exponents=(1.0,))
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1.0 |")]
    assert len(rows) == 2
    for row in rows:
        contiguous, greedy, planned, bound = map(float, row[4:8])
        assert bound <= planned + 1e-9 and planned <= greedy + 1e-9


def test_offload_runs_on_a_random_model():
    from benchmarks import offload
    report = offload.main(new_tokens=4, cache_sizes=[1, 48], policies=("lru",), repeats=1)
    assert "| 48 | lru |" in report and "| 1 | lru |" in report
    assert "| NO |" not in report  # every offloaded row generated the resident model's tokens
def test_hf_speed_runs_at_a_tiny_batch():
    pytest.importorskip("transformers")
    from benchmarks import hf_speed
    report = hf_speed.main(["mixtral"], repeats=1, batch_size=1, seq_len=8)
    for row in hf_speed.ROWS:
        assert f"| {row} | " in report


def test_skinny_kernel_runs_at_a_tiny_shape():
    from benchmarks import skinny_kernel
    from moekit.experts.cpu import skinny
    report = skinny_kernel.main([1, 3], repeats=1, dim=16, expert_dim=8, num_experts=2)
    if skinny.available():
        assert "| 3 | " in report and report.count("GB/s") >= 12
    else:
        assert "nothing was measured" in report
