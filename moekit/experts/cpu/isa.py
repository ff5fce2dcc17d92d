"""What this CPU offers: its model, its vector ISA and whether it multiplies bf16 natively,
from /proc/cpuinfo (Linux) and torch's own capability (torch.backends.cpu.get_cpu_capability()).

Decide a bf16 path from ``CpuIsa.native_bf16``, never by assuming a machine kind: the same
code runs on CPUs that emulate bf16 products (AVX2) and on CPUs that run them in hardware
(AVX512-BF16, AMX-BF16, Arm's BF16), several times apart in speed either way.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import NamedTuple

import torch

# Feature flags that multiply bf16 in hardware: x86 (/proc/cpuinfo "flags") and Arm ("Features").
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}
# The widest vector ISA among the flags, widest first.
VECTOR_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"))


class CpuIsa(NamedTuple):
    """model: the CPU's name; flags: its feature flags (empty where /proc/cpuinfo has none);
    torch_capability: the kernels torch picked ("AVX512", "AVX2", "DEFAULT", ...)."""

    model: str
    flags: frozenset[str]
    torch_capability: str

    @property
    def native_bf16(self) -> list[str]:
        """The features that run bf16 matrix products in hardware, by name (empty: emulated)."""
        return [name for flag, name in NATIVE_BF16_FLAGS.items() if flag in self.flags]

    @property
    def vector_isa(self) -> str:
        """The widest vector instruction set the flags list, or "unknown"."""
        return next((name for flag, name in VECTOR_FLAGS if flag in self.flags), "unknown")

    def describe(self) -> str:
        """One line for a report's header, e.g. "AMD EPYC 9R14, AVX-512, AVX512-BF16, torch
        kernels AVX512"."""
        bf16 = ", ".join(self.native_bf16) or "no native bf16"
        return f"{self.model}, {self.vector_isa}, {bf16}, torch kernels {self.torch_capability}"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first processor in /proc/cpuinfo's text; ("", {})
    for what it does not list. x86 names the flags "flags", Arm "Features"."""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
    return model, flags or frozenset()


def cpu_isa(cpuinfo: str | None = None, torch_capability: str | None = None) -> CpuIsa:
    """This CPU's CpuIsa; cpuinfo and torch_capability override what is read (for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = parse_cpuinfo(cpuinfo)
    if torch_capability is None:
        torch_capability = torch.backends.cpu.get_cpu_capability()
    return CpuIsa(model or platform.processor() or platform.machine(), flags, torch_capability)
