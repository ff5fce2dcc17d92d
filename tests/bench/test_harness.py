"""The benchmark harness: what it says about the machine."""

from __future__ import annotations

from moekit.bench import harness
from moekit.experts.cpu.isa import cpu_isa


def test_bf16_note_follows_the_cpu_flags():
    def note(flags):
        return harness.bf16_matmul_note(cpu_isa(f"model name : x\nflags : {flags}\n", "AVX512"))

    assert note("fpu avx2 avx512f") == "no AVX512-BF16/AMX/BF16 here: bf16 matmul is emulated"
    assert note("avx512f avx512_bf16 amx_bf16") == \
        "AMX-BF16 and AVX512-BF16 here: bf16 matmul runs natively"
    assert note("avx512f avx512_bf16") == "AVX512-BF16 here: bf16 matmul runs natively"
