"""Where compiled kernels are kept, and whether that place can be trusted.

A cached library is code that this user's processes load, so its folder and files must be
owned by this user and writable by nobody else; the folder is created 0700. When the cache
cannot be located (no HOME, a uid without a passwd entry, common in containers) or trusted, the
caller builds in ``private_folder()``: a temporary folder of this process, removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: builds there are not serialised
    fcntl = None

LOCK_NAME = "build.lock"
_private: Path | None = None


class UnusableCache(Exception):
    """The kernel cache cannot be located, created, written or trusted; the message says why."""


def cache_dir() -> Path:
    """MOEKIT_CACHE_DIR, else $XDG_CACHE_HOME/moekit, else ~/.cache/moekit; UnusableCache when
    none can be located."""
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "moekit"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError) as error:  # no HOME and no passwd entry for the uid
        raise UnusableCache(f"no home folder to hold the kernel cache ({error}); set "
                            "MOEKIT_CACHE_DIR") from error
    return home / ".cache" / "moekit"


def require_private_folder(folder: Path) -> None:
    """Create folder (0700) if it is missing; UnusableCache unless it is a folder owned by this
    user, writable by this user and by nobody else."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as error:
        raise UnusableCache(f"cannot create the kernel cache {folder}: {error}") from error
    if not stat.S_ISDIR(info.st_mode):
        raise UnusableCache(f"the kernel cache {folder} is not a folder")
    _require_owned_and_private(folder, info, f"chmod go-w {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnusableCache(f"the kernel cache {folder} is read-only")


def require_private_file(path: Path) -> None:
    """UnusableCache unless path is missing or is a regular file (not a link) owned by this user
    and writable by nobody else."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as error:
        raise UnusableCache(f"cannot read {path}: {error}") from error
    if not stat.S_ISREG(info.st_mode):
        raise UnusableCache(f"{path} is not a regular file")
    _require_owned_and_private(path, info, f"rm {path}")


def _require_owned_and_private(path: Path, info: os.stat_result, fix: str) -> None:
    if info.st_uid != os.geteuid():
        raise UnusableCache(f"{path} is owned by uid {info.st_uid}, not by this user "
                            f"(uid {os.geteuid()}): whoever owns it could run code here")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnusableCache(f"{path} is writable by group or others (mode "
                            f"{stat.S_IMODE(info.st_mode):o}): anyone who can write it could run "
                            f"code here; fix with `{fix}`")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's build lock (an exclusive flock; released if the process dies): the first
    process builds, those that start at the same time wait and then find the library built."""
    handle = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def private_folder() -> Path:
    """This process's own temporary folder for kernels (0700, removed at exit)."""
    global _private
    if _private is None:
        try:
            _private = Path(tempfile.mkdtemp(prefix="moekit-kernels-"))
        except OSError as error:
            raise UnusableCache(f"cannot create a temporary folder: {error}") from error
        atexit.register(shutil.rmtree, _private, ignore_errors=True)
    return _private
