"""What a checkpoint's trainer_state.pt holds, and the checks that it agrees with itself.

The state is a dict of plain values and tensors (it loads with
``torch.load(weights_only=True)``)::

    step              optimizer steps done (int >= 0)
    data_batches      training batches drawn from the data generator: step * grad_accum
                      (absent from checkpoints written before it was recorded)
    data_rng          state of the data generator [N] uint8: the position in the data
    torch_rng         torch's CPU generator state [N] uint8 (cuda_rng too on a GPU)
    optimizer         AdamW's state dict; each parameter's "step" count is at most step,
                      and the largest equals it
    elapsed_seconds   training time so far (float >= 0)

A state whose values disagree (a torn save, an edited file) is refused with a
CheckpointError that names the file and the value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError

# data_batches is checked when present: checkpoints written before it was recorded lack it
REQUIRED = ("step", "data_rng", "torch_rng", "optimizer", "elapsed_seconds")


def trainer_state(step: int, grad_accum: int, optimizer_state: dict[str, Any],
                  data_rng: torch.Generator, elapsed_seconds: float,
                  device: torch.device) -> dict[str, Any]:
    """The state to save at an optimizer-step boundary (every batch of ``step`` drawn, none of the next)."""
    state = {"step": step, "data_batches": step * grad_accum, "optimizer": optimizer_state,
             "torch_rng": torch.get_rng_state(), "data_rng": data_rng.get_state(),
             "elapsed_seconds": elapsed_seconds, "schedule": "warmup_cosine"}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _rng_size_ok(value: Any) -> bool:
    expected = torch.get_rng_state()
    return (isinstance(value, torch.Tensor) and value.dtype == expected.dtype
            and value.shape == expected.shape)


def check_trainer_state(state: Any, path: Path, step: int, grad_accum: int) -> None:
    """Raise CheckpointError unless ``state`` (read from path) is a complete state
    of optimizer step ``step`` (the checkpoint's) of a run with ``grad_accum`` micro-batches."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a trainer state: it holds a {type(state).__name__}")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a complete trainer state")
    saved = state["step"]
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 0:
        raise CheckpointError(f"{path}: step must be an integer >= 0, got {saved!r}")
    if saved != step:
        raise CheckpointError(f"{path}: step {saved} disagrees with its checkpoint's step {step}")
    if state.get("data_batches", step * grad_accum) != step * grad_accum:
        raise CheckpointError(f"{path}: data_batches {state['data_batches']!r} disagrees with step "
                                f"{step} x grad_accum {grad_accum} = {step * grad_accum}")
    for key in ("data_rng", "torch_rng"):
        if not _rng_size_ok(state[key]):
            got = state[key]
            described = (f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor)
                         else type(got).__name__)
            raise CheckpointError(f"{path}: {key} must be a torch generator state (uint8 "
                                    f"[{torch.get_rng_state().numel()}]), got {described}")
    elapsed = state["elapsed_seconds"]
    if not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) or elapsed < 0:
        raise CheckpointError(f"{path}: elapsed_seconds must be a finite number >= 0, got {elapsed!r}")
    _check_optimizer_steps(state["optimizer"], path, step)


def _check_optimizer_steps(optimizer: Any, path: Path, step: int) -> None:
    """Each parameter's AdamW step count is at most step and the largest equals it
    (a parameter that never had a gradient has no count)."""
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise CheckpointError(f"{path}: optimizer is not an optimizer state dict "
                                "(it needs 'state' and 'param_groups')")
    counts = []
    for index, values in optimizer["state"].items():
        count = values.get("step") if isinstance(values, dict) else None
        if count is None:
            raise CheckpointError(f"{path}: the optimizer state of parameter {index} has no step count")
        counts.append(float(count))
    largest = max(counts, default=0.0)
    if largest != step or min(counts, default=0.0) < 0:
        raise CheckpointError(f"{path}: the optimizer has taken {largest:g} steps but the "
                                f"checkpoint is of step {step}; the state is torn")
