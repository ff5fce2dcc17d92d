"""The timing harness: a ``Row`` is one timed candidate; ``time_rows`` times rows
interleaved, ``peak_memory_mib`` probes /proc for a call's peak memory, and
``read_bandwidth_gbs`` measures the machine's best-case read bandwidth,
``time_cold_rounds`` times calls as a decode step finds the caches, and
``bf16_matmul_note`` says whether this CPU runs bf16 matrix products natively
(moekit/experts/cpu/isa.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from moekit.experts.cpu.isa import CpuIsa, cpu_isa


@dataclass
class Row:
    """A candidate: forward() and forward_backward() each run one call (a row
    without a backward, such as the weight stream, has forward_backward None);
    release() drops the gradients a forward_backward left behind."""

    name: str
    forward: Callable[[], object]
    forward_backward: Callable[[], object] | None
    release: Callable[[], None]
    note: str = ""
    limit_dtype: torch.dtype = torch.float32  # the limit rows its ratio divides by


def time_rows(rows: list[Row], repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of every call by (row name, "f" or "fb"): two warm-up calls of each row,
    then ``repeats`` rounds, each round calling every row once in turn."""
    times: dict[tuple[str, str], list[float]] = {}
    def calls(row: Row) -> list[tuple[str, Callable[[], object]]]:
        pairs = [("f", row.forward), ("fb", row.forward_backward)]
        return [(kind, fn) for kind, fn in pairs if fn is not None]

    for row in rows:  # warm-up (and compilation) first
        for _ in range(2):
            for _, fn in calls(row):
                fn()
    for _ in range(repeats):
        for row in rows:
            for kind, fn in calls(row):
                start = time.perf_counter()
                fn()
                times.setdefault((row.name, kind), []).append(time.perf_counter() - start)
    return times


def time_cold_rounds(calls: dict[str, Callable[[], object]], repeats: int,
                     setting: Callable[[str], AbstractContextManager] | None = None
                     ) -> dict[str, list[float]]:
    """name -> seconds of that call in each of ``repeats`` rounds, round-robin, after two warm-up
    calls each, under no_grad; before every timed call a 128 MiB sum empties the caches, as a
    decode step's weight stream leaves them. setting(name): a context the call of that name runs
    in, entered before its timer starts (e.g. a float32 matmul precision)."""
    setting = setting or (lambda name: contextlib.nullcontext())
    flush = torch.randn(32 * 1024 * 1024)
    times = {name: [] for name in calls}
    with torch.no_grad():
        for name, call in calls.items():
            with setting(name):
                call()
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                with setting(name):
                    flush.sum()
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
    return times


def time_rows_isolated(limits: list[Row], rows: list[Row], repeats: int
                       ) -> dict[tuple[str, str], list[float]]:
    """time_rows for each of ``rows`` alone beside the limit rows, so that no heavy row
    (a per-expert loop taking seconds, whose freed memory makes the next allocation slow)
    shares its rounds; the limit rows' times are pooled over all of these runs."""
    times: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        for key, seconds in time_rows(limits + [row], repeats).items():
            times.setdefault(key, []).extend(seconds)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], release: Callable[[], None] = lambda: None) -> float:
    """Rise of the peak resident set over one call of fn, from a baseline taken after
    release() (Linux only; NaN elsewhere). Releasing the previous call's gradients
    first makes the figure count the gradients fn creates plus its temporaries;
    without it, it would depend on whether the freed gradients' pages went back to
    the OS, which changes from call to call."""
    try:
        release()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current resident set
        fn()
        return (_status_kib("VmHWM") - baseline) / 1024
    except (OSError, RuntimeError):
        return float("nan")


def read_bandwidth_gbs() -> float:
    """Best-case read bandwidth: the fastest of five sums of a 256 MiB buffer."""
    big = torch.ones(64 * 2**20)
    big.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / min(times) / 1e9


def bf16_matmul_note(isa: CpuIsa | None = None) -> str:
    """What this CPU (isa, default this machine's) offers bf16 matrix products: AMX-BF16,
    AVX512-BF16 or Arm's BF16 run them natively; without any they are emulated in float32."""
    native = (isa or cpu_isa()).native_bf16
    if native:
        return f"{' and '.join(native)} here: bf16 matmul runs natively"
    return "no AVX512-BF16/AMX/BF16 here: bf16 matmul is emulated"
