"""Reading a run's metrics.jsonl, which a crash or a full disk can leave with a partial last line.

Each line is one JSON record with at least ``kind`` and ``step``. A last line that
is not complete JSON is what an interrupted write leaves: readers skip it, and a
resume cuts it off (and says so). A bad line anywhere else is a UsageError naming
the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """(the records of a metrics.jsonl, None or a description of its partial last line)."""
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from error
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records, partial = [], None
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record or "kind" not in record:
                raise ValueError("not a record with kind and step")
        except ValueError as error:
            if index == len(numbered) - 1:
                partial = f"{path}: line {number} is partial ({len(line)} characters, {error})"
                break
            raise UsageError(f"{path}: line {number} is not a metrics record ({error}); "
                             "remove it to read the run") from error
        records.append(record)
    return records, partial
