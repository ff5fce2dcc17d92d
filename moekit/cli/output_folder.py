"""The one check of an output folder, for ``--out`` of train, compare, inspect and plan-placement.

``writable_folder(path, flag)`` makes the folder (with its parents) and writes a
throwaway file into it, so that a file in the way, a path below a file, or a
folder on a virtual or read-only file system (``/proc``, ``/sys``) is a
``UsageError`` naming the path before any work starts, not a traceback at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from moekit.errors import UsageError


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """path as a folder that exists and takes new files, created with its parents when
    missing. UsageError, naming the path and what to do, when it cannot be."""
    folder = Path(path).expanduser()
    blocker = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == folder else f"is below the file {blocker}"
        raise UsageError(f"{flag} {folder} {where}, not a folder; give a folder path "
                         "(an existing folder or a new one)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {folder}: cannot write files there ({error.strerror or error}); "
                         "give a folder on a writable disk") from error
    return folder
