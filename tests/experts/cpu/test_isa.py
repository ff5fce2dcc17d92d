"""The CPU's model and ISA from /proc/cpuinfo's text and torch's capability, on sample lines."""

from __future__ import annotations

import torch

from moekit.experts.cpu.isa import cpu_isa, parse_cpuinfo

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx f16c avx2 avx512f avx512bw avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu
"""
ZEN3 = "model name\t: AMD EPYC 7R13 Processor\nflags\t\t: fpu sse2 avx f16c avx2 fma\n"
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8488C\n"
                   "vmx flags\t: ept vpid\n"  # not the feature flags
                   "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
GRAVITON3 = ("processor\t: 0\nBogoMIPS\t: 2100.00\n"
             "Features\t: fp asimd evtstrm aes pmull sve bf16 i8mm\nCPU part\t: 0xd40\n")


def test_parse_cpuinfo_takes_the_first_processor():
    model, flags = parse_cpuinfo(ZEN4)
    assert model == "AMD EPYC 9R14 96-Core Processor"
    assert "avx512_bf16" in flags and "avx2" in flags  # not the second processor's line
    assert parse_cpuinfo(SAPPHIRE_RAPIDS)[1] >= {"amx_bf16", "avx512_bf16"}
    assert "ept" not in parse_cpuinfo(SAPPHIRE_RAPIDS)[1]
    assert parse_cpuinfo("") == ("", frozenset())


def test_native_bf16_and_vector_isa_follow_the_flags():
    zen4 = cpu_isa(ZEN4, "AVX512")
    assert zen4.native_bf16 == ["AVX512-BF16"] and zen4.vector_isa == "AVX-512"
    assert zen4.describe() == ("AMD EPYC 9R14 96-Core Processor, AVX-512, AVX512-BF16, "
                               "torch kernels AVX512")
    zen3 = cpu_isa(ZEN3, "AVX2")
    assert zen3.native_bf16 == [] and zen3.vector_isa == "AVX2"
    assert zen3.describe().endswith("AVX2, no native bf16, torch kernels AVX2")
    assert cpu_isa(SAPPHIRE_RAPIDS, "AVX512").native_bf16 == ["AMX-BF16", "AVX512-BF16"]
    graviton = cpu_isa(GRAVITON3, "SVE256")
    assert graviton.native_bf16 == ["Arm BF16"] and graviton.vector_isa == "SVE"
    assert graviton.model  # no "model name" on Arm: the platform's name instead


def test_this_machine_is_read_with_torch_capability():
    isa = cpu_isa()
    assert isa.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert isa.model
