"""The benchmark harness: what it says about the machine."""

from __future__ import annotations

from moekit.bench import harness


def test_bf16_note_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(harness, "cpu_features", lambda: "flags : fpu avx2 avx512f")
    assert harness.bf16_matmul_note() == "no AVX512-BF16/AMX here: bf16 matmul is emulated"
    monkeypatch.setattr(harness, "cpu_features", lambda: "flags : avx512f avx512_bf16 amx_bf16")
    assert harness.bf16_matmul_note() == "AMX-BF16 and AVX512-BF16 here: bf16 matmul runs natively"
    monkeypatch.setattr(harness, "cpu_features", lambda: "flags : avx512f avx512_bf16")
    assert harness.bf16_matmul_note() == "AVX512-BF16 here: bf16 matmul runs natively"
