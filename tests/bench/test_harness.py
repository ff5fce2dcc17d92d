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


def test_isolated_timing_never_puts_two_candidates_in_the_same_rounds():
    calls = []

    def row(name):
        return harness.Row(name, lambda: calls.append(name), None, lambda: None)

    limits, candidates = [row("limit")], [row("a"), row("b"), row("c")]
    times = harness.time_rows_isolated(limits, candidates, repeats=3)
    # One session per candidate: its calls form one block, with only limit calls inside it.
    for name in "abc":
        first, last = calls.index(name), len(calls) - 1 - calls[::-1].index(name)
        assert set(calls[first:last + 1]) == {name, "limit"}
        assert len(times[(name, "f")]) == 3
    assert len(times[("limit", "f")]) == 9  # the limit rows' rounds, pooled
