"""Compile a C source shipped with moekit into a shared library on first use, cached on disk.

The library is built for the machine it runs on (``-march=native``), so the cache key holds the
source, the compiler and flags, and the CPU's feature flags: a cache shared between different
machines (a home directory on NFS) never hands one machine another's instructions.
Set MOEKIT_CACHE_DIR to choose the folder (default: $XDG_CACHE_HOME/moekit or ~/.cache/moekit),
CC to choose the compiler.

A cached library is code that every process of this user loads, so the cache is trusted only
when nobody else can write it (moekit/experts/cpu/cache_folder.py): otherwise, or when it cannot
be located or written, the library is built in a private temporary folder for this process, with
a warning.
Each library is loaded only if its SHA-256 matches the one recorded when it was built (a
truncated or altered file is rebuilt, never loaded), and a file lock lets one process build
while the others that start at the same time wait for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

from moekit.experts.activations import ELEMENTWISE_CODES
from moekit.experts.cpu.cache_folder import (UnusableCache, cache_dir, locked, private_folder,
                                             require_private_file, require_private_folder)

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
    """The path of source compiled into a shared library, verified, building it if not cached.

    In the user's cache when it can be trusted and written; else, with a RuntimeWarning saying
    why, in a private temporary folder of this process."""
    compiler = find_compiler()
    try:
        folder = cache_dir()
        require_private_folder(folder)
        return _build_in(folder, compiler, source)
    except UnusableCache as error:
        reason = str(error)
    warnings.warn(f"not using the kernel cache: {reason}; building in a private temporary folder "
                  "for this process", RuntimeWarning, stacklevel=2)
    try:
        return _build_in(private_folder(), compiler, source)
    except UnusableCache as error:  # not even a folder this process makes for itself
        raise KernelBuildError(f"{reason}; and {error}") from error


def _build_in(folder: Path, compiler: str, source: Path) -> Path:
    code = source.read_bytes()
    failures = []
    for flags in (NATIVE_FLAGS + ACTIVATION_DEFINES, PORTABLE_FLAGS + ACTIVATION_DEFINES):
        command = " ".join(flags + LIBRARIES)
        key = hashlib.sha256(b"\0".join([code, compiler.encode(), command.encode(),
                                         platform.machine().encode(), cpu_features().encode()]))
        target = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
        try:
            with locked(folder):
                if _verified(target):
                    return target
                _compile(compiler, flags, source, target)
                return target
        except OSError as error:  # the lock or the files: a read-only folder, a full disk
            raise UnusableCache(f"cannot write to {folder}: {error}") from error
        except KernelBuildError as error:
            failures.append(str(error))
    raise KernelBuildError("; ".join(failures))


def digest_path(library: Path) -> Path:
    """Where the SHA-256 of a built library is recorded: beside it."""
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """Whether target is a cached library that may be loaded as it is: False when it is missing
    or does not match its recorded SHA-256 (it is then rebuilt; a warning says so when it was
    truncated or altered). UnusableCache when it or its record is writable by others."""
    record = digest_path(target)
    for path in (target, record):
        require_private_file(path)
    if not target.exists():
        return False
    if not record.exists():  # built by an older moekit, or interrupted: build again
        return False
    if _sha256(target) == record.read_text().strip():
        return True
    warnings.warn(f"the cached kernel {target} does not match the SHA-256 recorded when it was "
                  "built (truncated or altered); rebuilding it", RuntimeWarning, stacklevel=2)
    return False


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    # Built beside the target and renamed into place, its hash recorded first: a reader never
    # sees half a file, and a library never appears without its record.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        try:
            result = subprocess.run([compiler, *flags, str(source), "-o", partial, *LIBRARIES],
                                    capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            raise KernelBuildError(f"{compiler} could not run: {error}") from error
        if result.returncode != 0:
            raise KernelBuildError(f"{Path(compiler).name} {' '.join(flags)} failed: "
                                   f"{result.stderr.strip()[-400:]}")
        os.chmod(partial, 0o700)
        _write_record(digest_path(target), _sha256(Path(partial)))
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def _write_record(record: Path, sha256: str) -> None:
    handle, partial = tempfile.mkstemp(suffix=".sha256", dir=record.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(sha256 + "\n")
        os.replace(partial, record)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
