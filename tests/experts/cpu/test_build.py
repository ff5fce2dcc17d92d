"""Building the CPU kernels: cached per source, compiler and CPU; failures named, never fatal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.experts.cpu import build

SOURCE = Path(build.__file__).with_name("skinny.c")
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                                    reason="no C compiler")


@needs_compiler
def test_built_once_per_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    library = build.build_library(SOURCE)
    assert library.parent == tmp_path and library.name.startswith("skinny-")
    built_at = library.stat().st_mtime_ns
    assert build.build_library(SOURCE) == library and library.stat().st_mtime_ns == built_at
    monkeypatch.setattr(build, "cpu_features", lambda: "flags : another machine")
    assert build.build_library(SOURCE) != library
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".so", ".so"]  # no partial files left


def test_failing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false"))
    with pytest.raises(build.KernelBuildError, match="false -O3 -march=native .* failed"):
        build.build_library(SOURCE)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_is_named(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(build.KernelBuildError, match="cannot write to the kernel cache"):
        build.build_library(SOURCE)


def test_build_failure_warns_and_falls_back(tmp_path):
    """A machine whose compiler fails still runs every layer, with one warning saying why."""
    code = ("import warnings, torch, moekit\n"
            "from moekit.experts.cpu import skinny\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=2))\n"
            "    print(moe(torch.randn(3, 8))[0].shape)\n"
            "    moe(torch.randn(3, 8))\n"
            "print(len([w for w in caught if 'skinny' in str(w.message)]))\n"
            "print(skinny.unavailable_reason())\n")
    env = {**os.environ, "CC": shutil.which("false"), "MOEKIT_CACHE_DIR": str(tmp_path),
           "MOEKIT_CPU_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            check=True)
    shape, warnings_seen, reason = result.stdout.splitlines()
    assert shape == "torch.Size([3, 8])" and warnings_seen == "1"
    assert reason.startswith("the skinny CPU kernel could not be built: ") and "failed" in reason


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.KernelBuildError, match=r"no C compiler found \(tried \$CC"):
        build.build_library(SOURCE)


def test_compiler_that_cannot_start_is_named(tmp_path, monkeypatch):
    not_a_program = tmp_path / "cc"
    not_a_program.write_bytes(b"\x00\x01 not an executable")
    not_a_program.chmod(0o755)
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(not_a_program))
    with pytest.raises(build.KernelBuildError, match=r"cc could not run: .*Exec format error"):
        build.build_library(SOURCE)
    assert list((tmp_path / "cache").iterdir()) == []
