"""A run's configuration binds its resume: the model and training configs and the parameter
dtype stored in config.json must be the ones a resume is given, except ``steps``, which
may change to extend (or shorten) the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import MODEL_FILE, CheckpointError, checkpoint_dirs
from .config import LMConfig, TrainConfig

EXTENDABLE = ("steps",)  # training fields a resume may change


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def run_dtype(run_dir: Path, extra: dict[str, Any]) -> str:
    """The parameter dtype of a run: stored in config.json, or (runs written before it
    was stored) that of its newest weights."""
    if "dtype" in extra:
        return str(extra["dtype"])
    found = checkpoint_dirs(run_dir)
    path = found[-1] / MODEL_FILE if found else Path(run_dir) / MODEL_FILE
    if not path.is_file():
        return "float32"
    with safe_open(str(path), "pt") as weights:
        dtypes = [weights.get_tensor(name).dtype for name in weights.keys()]  # noqa: SIM118 - safe_open is not a dict
    floating = [d for d in dtypes if d.is_floating_point]
    return dtype_name(floating[0]) if floating else "float32"


def config_differences(stored: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """``name: run X, given Y`` for every field (nested dicts flattened as a.b) that differs."""
    found = []
    for name in sorted(set(stored) | set(given)):
        a, b = stored.get(name), given.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{prefix}{name}.")
        elif a != b:
            found.append(f"{prefix}{name}: run {a!r}, given {b!r}")
    return found


def check_resume_config(run_dir: Path, stored: tuple[LMConfig, TrainConfig, str],
                        given: tuple[LMConfig, TrainConfig, str]) -> None:
    """Raise CheckpointError naming every field of (model config, training config, dtype)
    that a resume would change, ``steps`` excepted."""
    (stored_model, stored_train, stored_dtype), (model, train, dtype) = stored, given
    stored_train = stored_train.to_dict() | {name: getattr(train, name) for name in EXTENDABLE}
    found = config_differences({"model": stored_model.to_dict(), "train": stored_train,
                                "dtype": stored_dtype},
                               {"model": model.to_dict(), "train": train.to_dict(),
                                "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype})
    if found:
        raise CheckpointError(f"the configs given differ from {Path(run_dir) / 'config.json'} "
                              f"({'; '.join(found)}); resume with the run's own configs "
                              f"(only {', '.join(EXTENDABLE)} may change)")
