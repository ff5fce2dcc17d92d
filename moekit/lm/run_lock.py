"""One writer per run folder: an OS file lock (``fcntl.flock`` on ``.lock``) held while a
training writes the folder, released when it ends (or its process dies).

A second training into the same folder, or a ``--resume`` of a folder in use, gets a
UsageError naming the holder's PID. Readers (``generate``, ``inspect``,
``plan-placement``) take no lock and are unaffected.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import UsageError

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(run_dir)``: hold the folder's lock (creating the folder when ``create``)."""

    def __init__(self, run_dir: Path, create: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.create = create
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if self.create:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UsageError(f"cannot create the run folder {self.run_dir}: "
                                 f"{error.strerror or error}") from error
        elif not self.run_dir.is_dir():
            return self  # nothing to lock; reading the run will say what is wrong
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UsageError(f"cannot open the lock file {path}: {error.strerror or error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.run_dir} is in use by another training (PID {holder}); "
                             "wait for it to end or stop it, or train into another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
