"""Compile a C source shipped with moekit into a shared library on first use, cached on disk.

The library is built for the machine it runs on (``-march=native``), so the cache key holds the
source, the compiler and flags, and the CPU's feature flags: a cache shared between different
machines (a home directory on NFS) never hands one machine another's instructions.
Set MOEKIT_CACHE_DIR to choose the folder (default: $XDG_CACHE_HOME/moekit or ~/.cache/moekit),
CC to choose the compiler.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from moekit.experts.activations import ELEMENTWISE_CODES

# -ffp-contract=fast: ISO C mode would otherwise keep a * b + c as a multiply and an add
# instead of one fused multiply-add (half the throughput of the kernels' inner loops).
NATIVE_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC",
                "-std=c11"]
PORTABLE_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
LIBRARIES = ["-lm"]  # after the source, where the linker looks for what it still needs
# The activation codes the kernels switch on, from the one table of activations.
ACTIVATION_DEFINES = [f"-DMOEKIT_ACT_{name.upper()}={code}"
                      for name, code in sorted(ELEMENTWISE_CODES.items())]


class KernelBuildError(RuntimeError):
    """The C compiler is missing or failed; the message says which and why."""


def cache_dir() -> Path:
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit"


def find_compiler() -> str:
    candidates = [os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc",
                  "gcc", "clang"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelBuildError("no C compiler found (tried $CC, Python's CC, cc, gcc, clang)")


def cpu_features() -> str:
    """The CPU's feature-flag line (Linux), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_library(source: Path) -> Path:
    """The path of source compiled into a shared library, building it if not cached."""
    compiler = find_compiler()
    code = source.read_bytes()
    failures = []
    for flags in (NATIVE_FLAGS + ACTIVATION_DEFINES, PORTABLE_FLAGS + ACTIVATION_DEFINES):
        command = " ".join(flags + LIBRARIES)
        key = hashlib.sha256(b"\0".join([code, compiler.encode(), command.encode(),
                                         platform.machine().encode(), cpu_features().encode()]))
        target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        try:
            _compile(compiler, flags, source, target)
            return target
        except KernelBuildError as error:
            failures.append(str(error))
    raise KernelBuildError("; ".join(failures))


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed into place: concurrent builds never see half a file.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
    except OSError as error:
        raise KernelBuildError(f"cannot write to the kernel cache {target.parent}: {error}") from error
    try:
        try:
            result = subprocess.run([compiler, *flags, str(source), "-o", partial, *LIBRARIES],
                                    capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            raise KernelBuildError(f"{compiler} could not run: {error}") from error
        if result.returncode != 0:
            raise KernelBuildError(f"{Path(compiler).name} {' '.join(flags)} failed: "
                                   f"{result.stderr.strip()[-400:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
