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
average the sharded expert weights (see docs/parallel.md). A copy of a
replicated expert gets only its share of the tokens' gradient; the copies'
gradients are summed (all_reduce_replicated_grads does both).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch.alltoall import (AllToAllDispatcher, check_overlap_chunks, expert_placement,
                                      gather_rows)
from moekit.dispatch.capacity import CapacityDispatcher
from moekit.dispatch.local import LocalDispatcher
from moekit.layer import MoE
from moekit.routers import BatchWideRouter
from moekit.routers.expert_threshold import ExpertThresholdRouter

# How each router's choice is kept exactly that of one process on all ranks' tokens.
# "per token": a token's experts depend on that token alone (and on replicated state
# such as the aux-loss-free bias, whose counts router_step sums over the group), so
# each rank routes its own tokens. "whole batch": a BatchWideRouter; every rank gets
# every rank's scores (gather_batch) and solves the same problem. A router not listed
# here is refused until its behaviour under expert parallelism is decided and tested.
# "per token, whole-batch thresholds": expert_threshold routes each token by the stored
# thresholds, and records its cutoffs over every rank's scores (gather_batch).
EXPERT_PARALLEL_ROUTING = {"topk": "per token", "hash": "per token", "dense": "per token",
                           "expert_threshold": "per token, whole-batch thresholds",
                           "expert_choice": "whole batch", "balanced": "whole batch"}


def expert_shard(num_experts: int, group: dist.ProcessGroup | None = None,
                 placement=None) -> list[int]:
    """The global expert ids this rank holds (by default a contiguous block); the
    placement is checked by expert_placement (every expert exactly once)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return expert_placement(num_experts, world, placement)[rank]


def _check_supported(moe: MoE) -> None:
    cfg = moe.config
    if cfg.router == "sparsemixer":
        raise ValueError("expert parallelism does not support router='sparsemixer' yet (not "
                         "tested: its training samples would be drawn per rank)")
    if cfg.router not in EXPERT_PARALLEL_ROUTING:
        raise ValueError(f"expert parallelism supports router in {sorted(EXPERT_PARALLEL_ROUTING)}, "
                         f"not router={cfg.router!r} (not yet made exact under expert parallelism)")
    if cfg.combine_weights_on != "output":
        raise ValueError(f"expert parallelism applies the combine weights on the token's own rank, "
                         f"after the experts: combine_weights_on={cfg.combine_weights_on!r} is not "
                         "supported")
    if moe.eval_dispatcher is not None:
        raise ValueError(f"expert parallelism does not support eval_capacity_fraction "
                         f"({cfg.eval_capacity_fraction}) yet; set it to None")
    if type(moe.dispatcher) not in (LocalDispatcher, CapacityDispatcher):
        raise ValueError(f"layer already uses {type(moe.dispatcher).__name__}")


def apply_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None = None,
                          placement=None, batch_group: dist.ProcessGroup | None = None,
                          overlap_chunks: int = 1) -> nn.Module:
    """Shard the experts of every MoE layer in ``module`` (in place) over ``group``
    (default: the world). ``placement`` lists for each rank the expert ids it holds
    (the same number on every rank, any order, every expert at least once; default
    contiguous blocks of E / W), or is a moekit.placement.Placement, e.g.
    plan_placement(measured loads, W, num_replicas), or a dict of those by MoE layer
    name (as in module.named_modules(), the layers of a `moekit plan-placement`
    file); outputs do not depend on it. An expert with copies on several ranks has
    its tokens split between them (see moekit.dispatch.alltoall); call
    all_reduce_replicated_grads after backward, which also sums the copies' gradients. Every
    rank must hold the same full weights before the call (e.g. the same seed, or a
    broadcast). ``batch_group`` (default ``group``): the ranks whose tokens make one
    batch for capacity, the aux losses and the whole-batch routers, when ``group`` is
    one of several expert-parallel groups over data-parallel ranks (moekit.parallel.fsdp).
    ``overlap_chunks`` N > 1: each layer cuts its tokens into N chunks whose all-to-alls
    overlap the other chunks' experts, and the shared experts run while the first rows
    travel (see moekit.dispatch.alltoall); with 1 only the shared experts overlap.
    Returns ``module``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("apply_expert_parallel needs torch.distributed initialised "
                         "(torch.distributed.init_process_group)")
    check_overlap_chunks(overlap_chunks)
    layers = {name: m for name, m in module.named_modules() if isinstance(m, MoE)}
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no moekit.MoE layer")
    if isinstance(placement, dict) and placement.keys() != layers.keys():
        raise ValueError(f"placement names layers {sorted(placement)}, the module has MoE layers "
                         f"{sorted(layers)}")
    for name, moe in layers.items():
        _check_supported(moe)
        layer_placement = placement[name] if isinstance(placement, dict) else placement
        shard = expert_shard(moe.config.num_experts, group, layer_placement)
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            local = param.detach()[shard].clone()
            setattr(experts, name, nn.Parameter(local, requires_grad=param.requires_grad))
        experts.expert_ids = shard
        moe.dispatcher = AllToAllDispatcher(moe.dispatcher, group, layer_placement, overlap_chunks)
        moe.dispatcher.batch_group = group if batch_group is None else batch_group
        if isinstance(moe.router, (BatchWideRouter, ExpertThresholdRouter)):
            moe.router.gather_batch = functools.partial(gather_rows, group=moe.dispatcher.batch_group)
    return module


def is_expert_parallel(param_name: str) -> bool:
    """True for the parameters apply_expert_parallel shards (name as in named_parameters)."""
    return ".experts." in f".{param_name}"


@torch.no_grad()
def all_reduce_replicated_grads(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients of the replicated (non-expert) parameters over the group:
    the data-parallel step the sharded experts must not get; and, in layers whose
    placement has copies of an expert, sum the copies' gradients (sum_expert_copy_grads)."""
    for name, param in module.named_parameters():
        if param.grad is not None and not is_expert_parallel(name):
            dist.all_reduce(param.grad, group=group)
    sum_expert_copy_grads(module)


@torch.no_grad()
def sum_expert_copy_grads(module: nn.Module) -> None:
    """Give every copy of an expert the sum of its copies' gradients, so the logical
    expert is trained as one (the copies start equal and stay equal under any
    optimizer that updates each element from its gradient alone). One all_reduce of a
    full-size [E, ...] gradient per expert parameter of each layer with copies, over
    the layer's group: E / S times the memory of the local shard."""
    for moe in module.modules():
        dispatcher = getattr(moe, "dispatcher", None)
        if not (isinstance(moe, MoE) and isinstance(dispatcher, AllToAllDispatcher)
                and dispatcher.has_copies):
            continue
        local_ids = torch.tensor(moe.experts.expert_ids)
        for param in moe.experts.parameters(recurse=False):
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            full = grad.new_zeros(moe.config.num_experts, *grad.shape[1:])
            full.index_add_(0, local_ids.to(grad.device), grad)
            dist.all_reduce(full, group=dispatcher.group)
            param.grad = full.index_select(0, local_ids.to(grad.device))
