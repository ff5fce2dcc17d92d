"""Run folders and checkpoints that are never half-written.

A run folder holds::

    config.json                    the model and training configs (again when --steps extends the run)
    model.safetensors              the latest weights (replaced atomically)
    manifest.json                  the SHA-256 of model.safetensors
    metrics.jsonl                  one JSON line per logged step or evaluation
    checkpoints/step-00000500/     model.safetensors, trainer_state.pt, manifest.json

A checkpoint is written into a hidden temporary folder and renamed into place
only when complete, so a crash leaves the previous checkpoint untouched; its
``manifest.json`` records the SHA-256 of both files, checked on load.
``trainer_state.pt`` holds only tensors and plain values and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import UsageError
from .config import LMConfig, TrainConfig

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


class CheckpointError(UsageError):
    """A run folder or checkpoint that is missing, partial or corrupt (bad input, not a bug)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, flush it to disk, then rename it onto path."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def weights_of(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict (parameters and persistent buffers) as contiguous CPU tensors."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def load_weights(model: torch.nn.Module, path: Path,
                 load_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
    """Load a safetensors file into model (through ``load_state_dict``, default the
    model's own, strict); a missing, unreadable or mismatched file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        weights = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
    try:
        if load_state_dict is None:
            model.load_state_dict(weights, strict=True)
        else:
            load_state_dict(weights)
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} does not match the model of this run: {error}") from error


def write_run_config(run_dir: Path, model_cfg: LMConfig, train_cfg: TrainConfig,
                     extra: dict[str, Any] | None = None) -> None:
    values = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), **(extra or {})}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(values, indent=2) + "\n")


def read_run_config(run_dir: Path) -> tuple[LMConfig, TrainConfig, dict[str, Any]]:
    """(model config, training config, the other keys) of a run folder."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}")
    try:
        values = json.loads(path.read_text())
        model_cfg = LMConfig.from_dict(values.pop("model"))
        train_cfg = TrainConfig.from_dict(values.pop("train"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a valid run config: {error}") from error
    return model_cfg, train_cfg, values


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model of a run folder (its model.safetensors, verified against the
    run's manifest.json), in eval mode."""
    from .model import MoETransformer  # the model is built only when a run is loaded

    model_cfg, _, _ = read_run_config(Path(run_dir))
    model = MoETransformer(model_cfg)
    verify_run_weights(run_dir)
    load_weights(model, Path(run_dir) / MODEL_FILE)
    return model.to(device).eval()


def weights_file(path: Path) -> Path:
    """model.safetensors of a run or checkpoint folder, or path itself if it is a file."""
    return path if path.is_file() else path / MODEL_FILE


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name))


def save_checkpoint(run_dir: Path, step: int, state_dict: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write checkpoints/step-<step>/ atomically (the model's ``state_dict`` and the
    trainer state), update the run's model.safetensors,
    and keep only the newest ``keep`` checkpoints. Returns the checkpoint folder.
    Whatever stops it (an error, an abort) removes its temporary folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    try:
        _write_checkpoint_folder(tmp, step, state_dict, trainer_state)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(stale)
    _replace_run_weights(Path(run_dir), final, step)
    return final


def _replace_run_weights(run_dir: Path, checkpoint: Path, step: int) -> None:
    """Copy a checkpoint's weights to the run's model.safetensors. The run's manifest.json
    is written first and names both the new and the current file's hash, so a crash
    between the two replacements leaves a pair that still verifies."""
    model = run_dir / MODEL_FILE
    new = json.loads((checkpoint / MANIFEST_FILE).read_text())["sha256"][MODEL_FILE]
    previous = _sha256(model) if model.is_file() else None
    atomic_write_text(run_dir / MANIFEST_FILE, json.dumps(
        {"step": step, "sha256": {MODEL_FILE: new}, "previous_sha256": previous}, indent=2) + "\n")
    atomic_write(model, lambda path: shutil.copyfile(checkpoint / MODEL_FILE, path))


def verify_run_weights(run_dir: str | Path) -> None:
    """Raise CheckpointError unless the run's model.safetensors matches the SHA-256 in its
    manifest.json (runs written before the run-level hash have none and are not checked)."""
    run_dir = Path(run_dir)
    path, manifest_path = run_dir / MODEL_FILE, run_dir / MANIFEST_FILE
    if not manifest_path.exists() or not path.is_file():
        return  # a missing model.safetensors is reported by whoever loads it
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = {manifest["sha256"][MODEL_FILE], manifest.get("previous_sha256")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is unreadable ({error}); it holds the hash of "
                              f"{MODEL_FILE}") from error
    if _sha256(path) not in expected:
        newest = checkpoint_dirs(run_dir)
        fix = (f"; copy {newest[-1] / MODEL_FILE} over it" if newest else "")
        raise CheckpointError(f"{path} is corrupt: it does not match the SHA-256 in {manifest_path}{fix}")


def _write_checkpoint_folder(tmp: Path, step: int, state_dict: dict[str, torch.Tensor],
                             trainer_state: dict[str, Any]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights_of(state_dict), str(tmp / MODEL_FILE), metadata={"step": str(step)})
    torch.save(trainer_state, tmp / STATE_FILE)
    manifest = {"step": step, "sha256": {name: _sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for name in (MODEL_FILE, STATE_FILE, MANIFEST_FILE):
        _fsync(tmp / name)


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # the same step saved again (e.g. right after a resume): swap, then drop the old
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)


def remove_temporary_files(run_dir: Path) -> list[Path]:
    """Remove what an interrupted save left in a run folder (checkpoints/.step-N.tmp
    and .old folders, .model.safetensors.tmp) and return what was removed. An .old
    folder whose step-N is missing (a swap cut short) is moved back instead."""
    run_dir = Path(run_dir)
    found = [run_dir / f".{MODEL_FILE}.tmp"]
    if (run_dir / CHECKPOINTS).is_dir():
        for old in (run_dir / CHECKPOINTS).glob(".step-*.old"):
            final = old.with_name(old.name[1:-len(".old")])
            if not final.exists():
                os.replace(old, final)
        found += [p for p in (run_dir / CHECKPOINTS).iterdir()
                  if p.name.startswith(".step-") and p.name.endswith((".tmp", ".old"))]
    removed = []
    for path in sorted(found):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files match their recorded hashes;
    otherwise a CheckpointError that names the checkpoint and what is wrong."""
    manifest_path = checkpoint / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes = manifest["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {checkpoint} is partial or corrupt: "
                              f"unreadable {MANIFEST_FILE} ({error})") from error
    if manifest.get("step") != checkpoint_step(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} is corrupt: its {MANIFEST_FILE} is of step "
                              f"{manifest.get('step')!r}")
    for name in (MODEL_FILE, STATE_FILE):
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} is partial: {name} is missing")
        if _sha256(path) != hashes.get(name):
            raise CheckpointError(f"checkpoint {checkpoint} is corrupt: {name} does not match "
                                  f"the hash in its {MANIFEST_FILE}")
    return manifest


def load_checkpoint(checkpoint: Path, model: torch.nn.Module,
                    load_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None = None
                    ) -> dict[str, Any]:
    """Verify a checkpoint, load its weights into model (see load_weights) and
    return its trainer state."""
    verify_checkpoint(checkpoint)
    load_weights(model, checkpoint / MODEL_FILE, load_state_dict)
    return load_trainer_state(checkpoint / STATE_FILE)


def load_trainer_state(path: Path) -> Any:
    """torch.load(path, weights_only=True); anything else in the file is refused with a
    CheckpointError (never a hint to load it unsafely)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it is not loaded "
            "(loading it could run code); resume from a checkpoint that moekit train wrote") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise CheckpointError(f"{path} is not a readable trainer state "
                              f"({type(error).__name__}: {first_line})") from error


def checkpoint_step(checkpoint: Path) -> int:
    """N of a checkpoints/step-N folder."""
    return int(checkpoint.name.removeprefix("step-"))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint folder of a run; CheckpointError if there is none."""
    found = checkpoint_dirs(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (no {CHECKPOINTS}/step-*)")
    return found[-1]
