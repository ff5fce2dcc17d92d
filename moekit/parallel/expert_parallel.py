"""apply_expert_parallel: turn every moekit MoE layer of a module into an expert-parallel one.

Each rank of the group keeps E / W of the experts (a contiguous block, rank r
holds experts [r * E / W, (r + 1) * E / W)); the router and the shared experts
stay replicated. Each rank feeds its own tokens; the layer sends every routed
token to the rank of its expert and back (moekit/dispatch/alltoall.py).

Gradients: an expert's gradient on its rank is the sum over all ranks' tokens
routed to it, i.e. what one process would compute on the concatenated tokens
of every rank. Replicated parameters (router, shared experts, everything
outside the MoE layers) get only this rank's tokens' gradient and need the
usual data-parallel sum (all-reduce) before the optimizer step; do not let DDP
average the sharded expert weights (see docs/parallel.md).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch.alltoall import AllToAllDispatcher, gather_rows
from moekit.dispatch.capacity import CapacityDispatcher
from moekit.dispatch.local import LocalDispatcher
from moekit.layer import MoE
from moekit.routers import ExpertChoiceRouter


def expert_shard(num_experts: int, group: dist.ProcessGroup | None = None) -> range:
    """The global expert ids this rank holds."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % world:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel "
                         f"world size ({world})")
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def _check_supported(moe: MoE) -> None:
    cfg = moe.config
    if cfg.router not in ("topk", "hash", "expert_choice"):
        raise ValueError(f"expert parallelism supports router='topk', 'hash' or 'expert_choice', not "
                         f"router={cfg.router!r} (its assignment is solved over the whole batch)")
    if cfg.balance_scope == "sequence":
        raise ValueError("expert parallelism supports balance_scope='batch' for now, not 'sequence'")
    if type(moe.dispatcher) not in (LocalDispatcher, CapacityDispatcher):
        raise ValueError(f"layer already uses {type(moe.dispatcher).__name__}")


def apply_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the experts of every MoE layer in ``module`` (in place) over ``group``
    (default: the world). Every rank must hold the same full weights before the call
    (e.g. the same seed, or a broadcast). Returns ``module``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("apply_expert_parallel needs torch.distributed initialised "
                         "(torch.distributed.init_process_group)")
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no moekit.MoE layer")
    for moe in layers:
        _check_supported(moe)
        shard = expert_shard(moe.config.num_experts, group)
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            local = param.detach()[shard.start:shard.stop].clone()
            setattr(experts, name, nn.Parameter(local, requires_grad=param.requires_grad))
        experts.expert_ids = shard
        moe.dispatcher = AllToAllDispatcher(moe.dispatcher, group)
        if isinstance(moe.router, ExpertChoiceRouter):
            moe.router.gather_batch = functools.partial(gather_rows, group=group)
    return module


def is_expert_parallel(param_name: str) -> bool:
    """True for the parameters apply_expert_parallel shards (name as in named_parameters)."""
    return ".experts." in f".{param_name}"


@torch.no_grad()
def all_reduce_replicated_grads(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients of the replicated (non-expert) parameters over the group:
    the data-parallel step the sharded experts must not get."""
    for name, param in module.named_parameters():
        if param.grad is not None and not is_expert_parallel(name):
            dist.all_reduce(param.grad, group=group)
