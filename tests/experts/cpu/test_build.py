"""Building the CPU kernels: cached per source, compiler and CPU in a folder only this user can
write, verified before loading, one build at a time; failures named, never fatal."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moekit.experts.cpu import build, cache_folder
from tests.conftest import needs

SOURCE = Path(build.__file__).with_name("skinny.c")
needs_compiler = needs(any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler")


@needs_compiler
def test_built_once_per_cpu(tmp_path, monkeypatch):
    cache = tmp_path / "new" / "cache"
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(cache))
    library = build.build_library(SOURCE)
    assert library.parent == cache and library.name.startswith("skinny-")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    built_at = library.stat().st_mtime_ns
    assert build.build_library(SOURCE) == library and library.stat().st_mtime_ns == built_at
    monkeypatch.setattr(build, "cpu_features", lambda: "flags : another machine")
    other = build.build_library(SOURCE)
    assert other != library
    # each library with its recorded SHA-256, the lock, and no partial files left
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [library.name, library.name + ".sha256", other.name, other.name + ".sha256", "build.lock"])
    assert build.digest_path(library).read_text().strip() == _sha256(library)


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false"))
    with pytest.raises(build.KernelBuildError, match="false -O3 -march=native .* failed"):
        build.build_library(SOURCE)
    assert [p.name for p in tmp_path.iterdir()] == ["build.lock"]


def _built_elsewhere(tmp_path, monkeypatch, cache: Path, why: str) -> Path:
    """build_library with MOEKIT_CACHE_DIR=cache: warns why, and builds in a private folder."""
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(cache))
    monkeypatch.setattr(cache_folder, "_private", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the private folder goes
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache: .*{why}.*private"):
        library = build.build_library(SOURCE)
    folder = library.parent
    assert folder.parent == tmp_path and folder.name.startswith("moekit-kernels-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    return library


@needs_compiler
def test_unwritable_cache_falls_back(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    _built_elsewhere(tmp_path, monkeypatch, tmp_path / "a_file" / "cache",
                     "cannot create the kernel cache")


@needs_compiler
def test_read_only_cache_falls_back(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_mkstemp = tempfile.mkstemp

    def read_only_cache(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == cache:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_cache)
    _built_elsewhere(tmp_path, monkeypatch, cache, "Read-only file system")
    assert [p.name for p in cache.iterdir()] == ["build.lock"]


@needs_compiler
def test_cache_writable_by_others_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    cache.chmod(0o775)
    _built_elsewhere(tmp_path, monkeypatch, cache, "writable by group or others")
    assert list(cache.iterdir()) == []


@needs_compiler
def test_cache_of_another_user_is_refused(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        cache = tmp_path / "theirs"
        cache.mkdir(mode=0o700)
        os.chown(cache, 65534, 65534)
    else:
        cache = Path("/")  # root's
    _built_elsewhere(tmp_path, monkeypatch, cache, "is owned by uid")


@needs_compiler
@pytest.mark.parametrize("change", ["writable by others", "owned by another user"])
def test_cached_library_others_could_write_is_refused(tmp_path, monkeypatch, change):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(cache))
    library = build.build_library(SOURCE)
    if change == "writable by others":
        library.chmod(0o777)
        why = "is writable by group or others"
    elif os.geteuid() == 0:
        os.chown(library, 65534, 65534)
        why = "is owned by uid 65534"
    else:  # only root can give a file away: check a file of root's instead
        with pytest.raises(cache_folder.UnusableCache, match="is owned by uid 0, not by this user"):
            cache_folder.require_private_file(Path(shutil.which("sh")).resolve())
        return
    monkeypatch.setattr(cache_folder, "_private", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.warns(RuntimeWarning, match=f"not using the kernel cache: {library} {why}"):
        assert build.build_library(SOURCE).parent.name.startswith("moekit-kernels-")


@needs_compiler
def test_altered_library_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    library = build.build_library(SOURCE)
    good = library.read_bytes()
    altered = bytearray(good)
    altered[len(altered) // 2] ^= 0xFF
    library.write_bytes(bytes(altered))
    with pytest.warns(RuntimeWarning, match="does not match the SHA-256 recorded .*rebuilding"):
        assert build.build_library(SOURCE) == library
    assert _sha256(library) == build.digest_path(library).read_text().strip()
    build.digest_path(library).unlink()  # a library without a record (an older moekit): rebuilt
    assert build.build_library(SOURCE) == library and build.digest_path(library).exists()


@needs_compiler
def test_truncated_library_is_rebuilt_not_loaded(tmp_path):
    """A truncated cached library used to kill the process (SIGBUS) when loaded."""
    env = {**os.environ, "MOEKIT_CACHE_DIR": str(tmp_path), "MOEKIT_CPU_KERNELS": "1"}
    code = ("import torch\n"
            "from moekit.experts.cpu import skinny\n"
            "print(skinny.available(), skinny.unavailable_reason())\n"
            "print(skinny.skinny_grouped(torch.ones(2, 8), torch.ones(1, 3, 8), [2]).sum().item())\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    (library,) = tmp_path.glob("skinny-*.so")
    library.write_bytes(library.read_bytes()[:library.stat().st_size // 2])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True None", "48.0"]
    assert "does not match the SHA-256 recorded" in result.stderr


@needs_compiler
def test_processes_starting_together_build_once(tmp_path):
    """Three processes on an empty cache: one compiles, the others wait for it."""
    log = tmp_path / "compiles.log"
    compiler = tmp_path / "logging-cc"
    compiler.write_text(f"#!/bin/sh\necho run >> {log}\nexec {build.find_compiler()} \"$@\"\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CC": str(compiler), "MOEKIT_CACHE_DIR": str(tmp_path / "cache")}
    code = ("from pathlib import Path\nfrom moekit.experts.cpu import build\n"
            f"print(build.build_library(Path({str(SOURCE)!r})))\n")
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    paths = {process.communicate()[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes)
    assert len(paths) == 1 and log.read_text().splitlines() == ["run"]


def test_unlocatable_home_falls_back(tmp_path, monkeypatch):
    """No HOME and no passwd entry (a container's uid): Path.home() raises."""
    monkeypatch.delenv("MOEKIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    with pytest.raises(cache_folder.UnusableCache, match="no home folder .* set MOEKIT_CACHE_DIR"):
        cache_folder.cache_dir()
    if any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        monkeypatch.setattr(cache_folder, "_private", None)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        with pytest.warns(RuntimeWarning, match="no home folder"):
            assert build.build_library(SOURCE).parent.parent == tmp_path


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
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["build.lock"]
