"""The benchmark harness: what it says about the machine."""

from __future__ import annotations

import contextlib

import torch

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


def test_cold_rounds_warm_up_then_time_each_call_in_its_setting():
    """Two warm-up calls each, then one timed call of every row per round, round-robin, each
    inside its own setting, without gradients."""
    events = []

    @contextlib.contextmanager
    def setting(name):
        events.append(f"enter {name}")
        yield

    calls = {name: (lambda name=name: events.append((name, torch.is_grad_enabled())))
             for name in ("a", "b")}
    times = harness.time_cold_rounds(calls, 3, setting)
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3}
    assert all(s >= 0 for seconds in times.values() for s in seconds)
    warm_up = ["enter a", ("a", False), ("a", False), "enter b", ("b", False), ("b", False)]
    rounds = ["enter a", ("a", False), "enter b", ("b", False)] * 3
    assert events == warm_up + rounds
