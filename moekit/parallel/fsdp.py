"""FSDP2 (torch.distributed.fsdp.fully_shard) composed with expert parallelism on a 2-D device
mesh, the layout large MoE trainers use.

The mesh has dims ("dp", "ep"), covering every rank of the world:
- the experts of every MoE layer are sharded over "ep" by apply_expert_parallel (a rank
  keeps E / ep experts), and that shard is fully_shard-ed over "dp" (the dp ranks holding
  the same experts each keep 1 / dp of them);
- every other parameter (attention, norms, routers, shared experts) is fully_shard-ed over
  all dp * ep ranks.
Every rank feeds its own tokens. Capacity, the aux losses and the whole-batch routers see
every rank's tokens (batch_group = the world), so each layer equals one process on the
concatenated tokens. Gradients are summed, not averaged, as under apply_expert_parallel:
each rank back-propagates its share of the global loss; FSDP's reduce-scatter then sums the
experts' gradients over "dp" (the all-to-all already summed them over "ep") and the other
gradients over every rank. Do not call all_reduce_replicated_grads.

fsdp_full_state_dict / fsdp_full_optimizer_state_dict gather such a module's weights and
optimizer state into the form one process has (every DTensor over its mesh, then the experts
over "ep"), as moekit.parallel.full_state_dict does for plain expert parallelism;
load_fsdp_full_state_dict / load_fsdp_full_optimizer_state_dict cut that form back, each rank
taking its shard without communication. So a checkpoint moves between one process, plain
expert parallelism and any (dp, ep) mesh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moekit.layer import MoE
from moekit.parallel.expert_parallel import apply_expert_parallel
from moekit.parallel.state import (
    _gather_experts,
    _local_experts,
    _optimizer_parameters,
    _sharded_experts,
    _sharded_parameters,
)

MESH_DIMS = ("dp", "ep")


def apply_fsdp_expert_parallel(module: nn.Module, mesh, placement=None,
                               overlap_chunks: int = 1) -> nn.Module:
    """Shard ``module`` (in place) on ``mesh``, a DeviceMesh with dims ("dp", "ep") over
    every rank (e.g. init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))):
    experts over "ep" then "dp", the rest over all ranks (see the module docstring).
    ``placement`` as apply_expert_parallel takes it, without copies; ``overlap_chunks`` as
    apply_expert_parallel takes it. Every rank must hold
    the same full weights before the call. Returns ``module``, whose parameters are now
    DTensors (read the full weights with DTensor.full_tensor)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"mesh must have dims {MESH_DIMS}, got {mesh.mesh_dim_names}")
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"mesh must cover every rank: it has {mesh.size()}, the world "
                         f"{dist.get_world_size()}")
    apply_expert_parallel(module, group=mesh["ep"].get_group(), placement=placement,
                          batch_group=dist.group.WORLD, overlap_chunks=overlap_chunks)
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for moe in layers:
        if moe.dispatcher.has_copies:
            raise ValueError("apply_fsdp_expert_parallel does not support placements with copies "
                             f"of experts, got {moe.dispatcher.placement}")
        fully_shard(moe.experts, mesh=mesh["dp"])
    fully_shard(module, mesh=DeviceMesh.from_group(dist.group.WORLD, mesh.device_type))
    for sharded in module.modules():
        if isinstance(sharded, FSDPModule):
            # sum, as the losses are per-rank shares; gloo has no pre-multiplied sum
            sharded.set_gradient_divide_factor(1.0)
            sharded.set_force_sum_reduction_for_comms(True)
    return module


def _full(value):
    """A DTensor's full tensor (a collective over its mesh); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` laid out as the DTensor ``like`` (each rank keeps its own shard, without
    communication: every rank holds the same ``full``); a plain ``like`` gives ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def _expert_keys(module: nn.Module) -> dict[str, MoE]:
    """State-dict key -> its layer, for every expert weight apply_expert_parallel sharded."""
    return {f"{prefix}.{name}": moe for prefix, moe in _sharded_experts(module)
            for name, _ in moe.experts.named_parameters(recurse=False)}


def fsdp_full_state_dict(module: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The state dict one process would have, from a module sharded by
    apply_fsdp_expert_parallel: every parameter gathered over its mesh, and the expert
    weights [E / ep, ...] also over "ep" to [E, ...]. Every rank must call it; with
    ``rank0_only`` the other ranks get None."""
    experts = _expert_keys(module)
    state = {}
    for key, value in module.state_dict().items():
        value = _full(value).detach()
        state[key] = _gather_experts(value, experts[key]) if key in experts else value
    if rank0_only and dist.get_rank() != 0:
        return None
    return state


def load_fsdp_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a one-process state dict (full expert weights) into a module sharded by
    apply_fsdp_expert_parallel: each rank keeps its experts' rows, then its shard of
    them over "dp" (and of every other parameter over all ranks). Strict."""
    experts = _expert_keys(module)
    local = dict(state)
    for key, like in module.state_dict().items():
        if key not in local:
            continue  # load_state_dict names it
        if key in experts:
            local[key] = _local_experts(local[key], experts[key], key)
        local[key] = _shard_like(local[key], like)
    module.load_state_dict(local, strict=True)


def fsdp_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                                   rank0_only: bool = False) -> dict[str, Any] | None:
    """optimizer.state_dict() as one process would have it, for an optimizer built over
    a module after apply_fsdp_expert_parallel: every per-parameter state tensor (e.g.
    AdamW's exp_avg, exp_avg_sq) gathered as fsdp_full_state_dict gathers its parameter.
    Every rank must call it; with ``rank0_only`` the other ranks get None."""
    sharded = _sharded_parameters(module)
    state = optimizer.state_dict()
    for index, param in enumerate(_optimizer_parameters(optimizer)):
        if index not in state["state"]:
            continue
        moe = sharded.get(id(param))
        entries = {}
        for key, value in state["state"][index].items():
            value = _full(value)
            if moe is not None and torch.is_tensor(value) and value.shape == param.shape:
                value = _gather_experts(value, moe)
            entries[key] = value
        state["state"][index] = entries
    if rank0_only and dist.get_rank() != 0:
        return None
    return state


def load_fsdp_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                                        state: dict[str, Any]) -> None:
    """Load a one-process optimizer state dict into the optimizer of a module sharded by
    apply_fsdp_expert_parallel: each state tensor of a parameter's shape is cut as that
    parameter is."""
    sharded = _sharded_parameters(module)
    per_param = dict(state["state"])
    for index, param in enumerate(_optimizer_parameters(optimizer)):
        if index not in per_param:
            continue
        moe = sharded.get(id(param))
        entries = {}
        for key, value in per_param[index].items():
            if torch.is_tensor(value) and value.dim() == param.dim() and value.dim() > 0:
                if moe is not None:
                    value = _local_experts(value, moe, f"optimizer state {index}.{key}")
                value = _shard_like(value, param)
            entries[key] = value
        per_param[index] = entries
    optimizer.load_state_dict({**state, "state": per_param})
