"""check_parameters_fit: a config too big for the memory free is a clear error before allocating."""

from __future__ import annotations

import pytest
import torch

import moekit
import moekit.memory
from moekit.cli import main
from moekit.errors import UsageError
from moekit.lm.config import LMConfig
from moekit.lm.model import MoETransformer
from moekit.memory import check_parameters_fit, free_bytes, human_bytes

from .lm.helpers import write_text_files


@pytest.mark.parametrize("layer", [moekit.MoE, moekit.SoftMoE])
def test_a_billion_experts_is_refused_naming_the_bytes_before_allocating(layer):
    config = moekit.MoEConfig(dim=1024, expert_dim=1024, num_experts=10**9, top_k=1)
    with pytest.raises(UsageError, match=r"MoEConfig\(num_experts=1000000000, dim=1024, expert_dim=1024\) "
                                         r"has [\d,]+ parameters, about 11\.\d PiB in float32, more than "
                                         r"the .* free on cpu; use smaller sizes, or build the layer "
                                         r"under `with torch.device\('meta'\):`"):
        layer(config)
    with torch.device("meta"):  # allocates nothing, so nothing to check
        assert layer(config).experts.down_proj.is_meta


def test_a_model_a_million_wide_is_refused():
    with pytest.raises(UsageError, match=r"LMConfig\(dim=1048576, num_layers=2, ffn_dim=64\) has "
                                         r"[\d,]+ parameters, about .* TiB in float32, more than the"):
        MoETransformer(LMConfig(dim=2**20, num_layers=2, num_heads=2, ffn_dim=64))


def test_the_estimate_is_parameters_times_the_dtype_size(monkeypatch):
    monkeypatch.setattr(moekit.memory, "free_bytes", lambda device: 1000)
    check_parameters_fit("x", 250, "fix it")  # 1000 bytes in float32: fits
    with pytest.raises(UsageError, match=r"^x has 251 parameters, about 1004 bytes in float32, more "
                                         r"than the 1000 bytes free on cpu; fix it$"):
        check_parameters_fit("x", 251, "fix it")
    check_parameters_fit("x", 500, "fix it", dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="layer"):  # the layers check too, before allocating
        moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4))


def test_free_memory_on_cpu_is_meminfo_available_plus_free_swap(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:  40 kB\nSwapFree:  2 kB\n")
    monkeypatch.setattr(moekit.memory, "_MEMINFO", meminfo)
    assert free_bytes(torch.device("cpu")) == 42 * 1024
    monkeypatch.setattr(moekit.memory, "_MEMINFO", tmp_path / "missing")
    assert free_bytes(torch.device("cpu")) is None  # not known: nothing is checked
    check_parameters_fit("x", 10**18, "fix it")
    assert free_bytes(torch.device("meta")) is None


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 3 * 2**30, 2**50)] == \
        ["0 bytes", "1023 bytes", "1.0 KiB", "1.5 KiB", "3.0 GiB", "1.0 PiB"]


def test_the_command_says_it_in_one_line(tmp_path, capsys):
    data = write_text_files(tmp_path / "data", count=20, size=300)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--num-experts",
              str(10**9), "--steps", "1", "--no-progress", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_experts=1000000000" in err and "TiB in float32" in err
    assert "use smaller sizes (--num-experts, --expert-dim, or a smaller preset)" in err
