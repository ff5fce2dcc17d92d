"""Balancing state that moves once per optimizer step: the aux-loss-free bias (DeepSeek-V3),
the expert-threshold router's thresholds and the global-batch balance counts
(balance_scope="global").

A forward never changes how the next one routes. Training forwards only record the counts
they routed (the top-k router's ``routed_load`` [E] int64, for bias_update_rate > 0; the
expert-threshold router's expert-choice cutoffs; the layer's ``step_load`` for
balance_scope="global"); a recomputation under activation
checkpointing records nothing, so forward and recompute route and weigh alike, and
micro-batches of gradient accumulation add up. Once per optimizer step, ``router_step(model)``
sums the routers' records over the ranks (one all_reduce for all layers per record dtype),
moves every bias by rate * sign(mean load - load) and every threshold by its moving average,
and starts the global-batch counts again. ``router_step_before``
makes an optimizer do that itself, for training loops one does not own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from moekit.layer import MoE


@torch.no_grad()
def router_step(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Once per optimizer step: move the aux-loss-free bias (or the expert thresholds) of every
    MoE layer in ``model`` from what its training forwards recorded since the last call, summed
    over ``group`` (default: every rank, when torch.distributed is initialised) with one
    all_reduce for all layers per record dtype, and start those records and the global-batch
    balance counts again from 0. Every rank of the group must call it, at the same step.
    Returns how many routers moved their state."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        if layer.step_load is not None:
            layer.step_load.zero_()
            layer.micro_batches_in_step = 0
    steps = [(m.router, record) for m in layers
             if (record := step_record(m.router)) is not None]
    # one all_reduce per record dtype, in the same order on every rank
    for dtype in sorted({record.dtype for _, record in steps}, key=str):
        group_steps = [(router, record) for router, record in steps if record.dtype == dtype]
        records = torch.cat([record.reshape(-1) for _, record in group_steps])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(records, group=group)
        for (router, record), summed in zip(group_steps,
                                            records.split([r.numel() for _, r in group_steps])):
            router.apply_step(summed.view_as(record))
    return len(steps)


def step_record(router: nn.Module) -> torch.Tensor | None:
    """The router's records since the last optimizer step (LinearRouter.step_record), or None
    for a router without balancing state or without that method."""
    record = getattr(router, "step_record", None)
    return None if record is None else record()


def router_step_before(model: nn.Module, optimizer: torch.optim.Optimizer,
                       group: dist.ProcessGroup | None = None) -> RemovableHandle:
    """Have ``optimizer.step()`` call router_step(model, group) first (a step pre-hook);
    returns the hook's handle (``.remove()`` undoes it)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

    def before_step(*_) -> None:  # a step pre-hook must return None
        router_step(model, group)

    return optimizer.register_step_pre_hook(before_step)
