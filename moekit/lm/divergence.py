"""The divergence guard: a step whose loss or gradient norm is not finite, or weights that
are not finite when a checkpoint is due, stop training before anything is saved, so the
last good checkpoint and model.safetensors stay as they were."""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from .distributed import SingleProcess


class TrainingDiverged(UsageError):
    """Training produced a non-finite loss, gradient norm or weight (a learning rate too
    high, bad data): the run stops with one line, its last good checkpoint kept."""


def step_problem(losses: list[float], grad_norm: float, parallel: SingleProcess) -> str | None:
    """What is not finite in an optimizer step (its micro-batch losses, the global gradient
    norm), agreed over every rank; None when all is finite."""
    bad_loss = next((loss for loss in losses if not math.isfinite(loss)), None)
    if _any_rank(bad_loss is not None, parallel) and bad_loss is None:
        bad_loss = math.nan  # another rank's loss: every rank stops at the same step
    if bad_loss is not None:
        return f"the loss is {bad_loss} (gradient norm {grad_norm})"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def weights_problem(model: torch.nn.Module, parallel: SingleProcess) -> str | None:
    """The first parameter that holds a non-finite value (on any rank), or None."""
    # each rank checks its own shard, explicitly: bool() of a reduced FSDP DTensor happens to
    # read this rank's partial value (torch 2.13), a detail not to rely on
    bad = next((name for name, p in model.named_parameters()
                if not torch.isfinite(parallel.local_shard(p)).all()), None)
    if _any_rank(bad is not None, parallel) and bad is None:
        bad = "a parameter on another rank"
    return None if bad is None else f"{bad} holds non-finite values after the optimizer step"


def _any_rank(flag: bool, parallel: SingleProcess) -> bool:
    """Whether flag is set on any rank (a collective: every rank calls it)."""
    if parallel.world_size == 1:
        return flag
    return bool(parallel.sum(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)
