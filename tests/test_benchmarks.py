"""Benchmark scripts run at small sizes as the commands they are, so they cannot rot
(no timing assertions; no test imports a benchmark script)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path


from moekit.experts.cpu import skinny
from tests.conftest import needs
from tests.lm.helpers import write_text_files

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python benchmarks/<name>.py args, with this checkout's moekit."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def report_of(name: str, *args: str) -> str:
    done = run_script(name, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_routing_balance_runs():
    report = report_of("routing_balance", "--tokens", "64", "--gap-cases", "3")
    for name in ("topk (k=2)", "topk, capacity 1.25", "topk, capacity 1.0, score policy",
                 "switch (k=1, capacity 1.25)", "sigmoid + group-limited (4 groups, 2)",
                 "expert_choice", "hash", "balanced", "dense (k=E)"):
        assert f"| {name} | isotropic |" in report
    assert "| cycle cancelling to convergence |" in report


def test_moe_speed_script_is_moekit_bench():
    assert "--shapes" in report_of("moe_speed", "--help")


def test_lm_throughput_runs_at_a_small_batch():
    report = report_of("lm_throughput", "--presets", "tiny", "--repeats", "1", "--batch-size", "2",
                       "--seq-len", "16")
    assert "| tiny |" in report and "| dense | " in report


def test_gpu_moe_refuses_without_cuda():
    done = run_script("gpu_moe", "--shapes", "S1", env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 1
    assert "needs an NVIDIA GPU" in done.stderr and "nothing was measured" in done.stderr


def test_gpu_moe_tables_build_at_a_tiny_shape_on_cpu():
    """The GPU benchmark's rows and table, on CPU (float32; Triton rows under the
    interpreter when Triton is installed), so the script cannot rot."""
    report = report_of("gpu_moe", "--cpu", "--dims", "8,16,16,2,2", "--repeats", "1")
    assert "| dense matmul chain | " in report and "| torch grouped_mm | " in report
    if "Triton not installed" not in report:
        assert "| moekit fused_moe (with counting sort) | " in report
        assert "| moekit MoE layer, backend triton (router and dispatch included) | " in report
        diff = float(report.split("relative difference ")[1].split()[0])
        assert diff < 1e-5


def test_expert_parallel_speed_runs_at_a_tiny_shape():
    report = report_of("expert_parallel_speed", "--world-sizes", "1", "2", "--repeats", "1",
                       "--dims", "16,32,16,4,2", "--overlap-chunks", "1", "2", "--shared-experts", "1")
    assert "| 1 | 1 | 16 |" in report and "1.00x" in report
    assert "| 2 | 1 | 8 |" in report and "| 2 | 2 | 8 |" in report


def test_placement_zipf_runs_at_a_small_size():
    report = report_of("placement_zipf", "--draws", "1", "--cases", "8,2,0", "8,2,2",
                       "--exponents", "1.0")
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1.0 |")]
    assert len(rows) == 2
    for row in rows:
        contiguous, greedy, planned, bound = map(float, row[4:8])
        assert bound <= planned + 1e-9 and planned <= greedy + 1e-9


def test_offload_runs_on_a_random_model():
    report = report_of("offload", "--new-tokens", "4", "--cache-sizes", "1", "48", "--policies", "lru",
                       "--repeats", "1")
    assert "| 48 | lru |" in report and "| 1 | lru |" in report
    assert "| NO |" not in report  # every offloaded row generated the resident model's tokens


@needs(importlib.util.find_spec("transformers") is not None,
       reason="transformers is not installed (pip install 'moekit[hf]')")
def test_hf_speed_runs_at_a_tiny_batch():
    report = report_of("hf_speed", "--models", "mixtral", "--repeats", "1", "--batch-size", "1",
                       "--seq-len", "8")
    for row in ("eager", "grouped_mm", "moekit", "moekit patch"):
        assert f"| {row} | " in report


def test_skinny_kernel_runs_at_a_tiny_shape():
    report = report_of("skinny_kernel", "--rows", "1", "3", "--repeats", "1", "--dim", "16",
                       "--expert-dim", "8", "--num-experts", "2")
    if skinny.available():
        assert "| 3 | " in report and report.count("GB/s") >= 12
    else:
        assert "nothing was measured" in report


def test_half_weight_decode_runs_one_round():
    done = run_script("half_weight_decode", "--repeats", "1")
    if not skinny.available():
        assert done.returncode == 1 and "nothing was measured" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    for dtype in ("float32", "bfloat16 expert weights", "float16 expert weights",
                  "bfloat16 layer"):
        assert f"| layer, {dtype} | " in done.stdout and f"| native call, {dtype} | " in done.stdout


def test_compiled_decode_runs_one_round():
    done = run_script("compiled_decode", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    for layer in ("float32", "bfloat16 expert weights", "float16 expert weights",
                  "bfloat16 layer"):
        assert f"| {layer} | " in done.stdout
    refused = run_script("compiled_decode", "--repeats", "0")
    assert refused.returncode != 0 and "--repeats must be at least 1, got 0" in refused.stderr


def test_batch_invariance_benchmark_runs():
    report = report_of("batch_invariance", "--shapes", "S3", "--repeats", "1")
    assert report.count("| S3 ") == 3 and "| fused | float32 |" in report


def test_expert_scaling_runs_and_continues(tmp_path):
    data = write_text_files(tmp_path / "data", count=40, size=600)
    args = ("--out", str(tmp_path / "scaling"), "--layouts", "1x512", "4x128", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--timing-repeats", "1",
            "--data", str(data))
    report = report_of("expert_scaling", *args)
    assert "| 1x512 (top-1) |" in report and "| 4x128 (top-4) |" in report
    assert (tmp_path / "scaling" / "4x128-seed0" / "result.json").is_file()
    assert report_of("expert_scaling", *args).splitlines()[-2:] == report.splitlines()[-2:]


def test_routing_lm_trains_each_variant_and_reads_finished_runs(tmp_path):
    data = write_text_files(tmp_path / "data", count=40, size=600)
    args = ("--out", str(tmp_path / "lm"), "--seeds", "0", "1", "--variants", "null4",
            "expert_threshold", "--repeats", "1", "--train-flags", "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "3", "--data", str(data))
    report = report_of("routing_lm", *args)
    rows = {line.split(" | ")[0]: line.split(" | ") for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert set(rows) == {"| default", "| null4", "| expert_threshold"}
    assert rows["| default"][1] == "2" and rows["| default"][3] == "+0.0000"
    assert rows["| default"][5] == "3.00"  # top-3: exactly k real experts per token
    assert rows["| null4"][6].endswith("%") and rows["| default"][6] == "-"
    assert rows["| default"][8].strip(" |") == "1.00"
    for variant in ("default", "null4", "expert_threshold"):
        for seed in (0, 1):
            assert (tmp_path / "lm" / f"{variant}-s{seed}" / "model.safetensors").is_file()
    # finished runs are read, not trained again: the same losses
    again = report_of("routing_lm", *args)
    assert [line.split(" | ")[2] for line in again.splitlines() if line.startswith("| null4")] == \
        [rows["| null4"][2]]


def test_placement_tokens_counts_rows_per_rank():
    report = report_of("placement_tokens", "--draws", "1")
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1.4 |")]
    measured = {(row[1], int(row[2])): float(row[4].strip(" |")) for row in rows}
    assert len(measured) == 4
    assert measured["plan_placement", 4] < measured["plan_placement", 0] < measured["contiguous", 0]
