"""The JSON file ``moekit params PATH`` reads: a transformers config.json or a moekit spec.

``read_model_file(path)`` returns a transformers config for a JSON object with
a ``model_type`` (read by ``moekit.params.hf_config``; needs transformers), and
an ``ArchSpec`` for any other object, a moekit spec (schema in
``moekit.params.spec_json``; a spec without a ``name`` is named after its file).
PATH is a file, or a folder holding config.json. A missing file, bad JSON, an
unknown model_type or a bad spec field raises a one-line UsageError naming the
file.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import UsageError
from moekit.params.hf_config import hf_config_from_dict
from moekit.params.spec_json import spec_from_dict


def read_model_file(path: str | Path):
    """A transformers config or an ``ArchSpec``, from the JSON file at ``path``."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        values = json.loads(file.read_text())
    except OSError as error:
        raise UsageError(f"cannot read {file}: {error.strerror or error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise UsageError(f"{file} must hold a JSON object, got a {type(values).__name__}")
    if "model_type" in values:
        return hf_config_from_dict(values, source=str(file))
    try:
        return spec_from_dict({"name": file.stem, **values})
    except (ValueError, TypeError) as error:
        raise UsageError(f"{file}: {error}") from error

