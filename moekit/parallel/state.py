"""State of an expert-parallel module in one-process form, and resharding checkpoints.

- full_state_dict / load_full_state_dict: gather the sharded expert weights into
  the state dict one process would have, and shard one back.
- full_optimizer_state_dict / load_full_optimizer_state_dict: the same for an
  optimizer's per-parameter state (e.g. AdamW's moments), so a checkpoint does not
  depend on the number of processes that wrote it.
- sharded_state_dict / load_sharded_state_dict: the expert weights as DTensors
  sharded on the expert dim, for torch.distributed.checkpoint (DCP), which then
  saves each rank's shard in parallel and reshards on load at any world size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch.alltoall import AllToAllDispatcher
from moekit.layer import MoE


def _sharded_experts(module: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name of the experts module, layer) for every expert-parallel layer."""
    return [(f"{name}.experts" if name else "experts", m) for name, m in module.named_modules()
            if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher)]


def _sharded_parameters(module: nn.Module) -> dict[int, MoE]:
    """id(parameter) -> its layer, for every sharded expert parameter."""
    return {id(param): moe for _, moe in _sharded_experts(module)
            for param in moe.experts.parameters(recurse=False)}


def _gather_experts(local: torch.Tensor, moe: MoE) -> torch.Tensor:
    """[S, ...] on every rank of the layer's group -> [E, ...] in expert order, one
    copy of each expert (its first; the copies are equal) (all ranks call it)."""
    dispatcher = moe.dispatcher
    local = local.detach().contiguous()
    pieces = [torch.empty_like(local) for _ in range(dispatcher.world_size)]
    dist.all_gather(pieces, local, group=dispatcher.group)
    by_slot = torch.cat(pieces)
    if dispatcher.slot_of_expert is None:
        return by_slot
    return by_slot.index_select(0, dispatcher.slot_of_expert.to(by_slot.device))


def _local_experts(full: torch.Tensor, moe: MoE, key: str) -> torch.Tensor:
    """The rows of this rank's experts from a full [E, ...] tensor."""
    if full.dim() == 0 or full.shape[0] != moe.config.num_experts:
        raise ValueError(f"{key} has shape {tuple(full.shape)}, expected [{moe.config.num_experts}, ...] "
                         "(all experts); is this a sharded state dict?")
    return full[list(moe.experts.expert_ids)]


def full_state_dict(module: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The state dict one process would have: every sharded expert weight gathered
    to its full [E, ...] shape. Every rank must call it (it all-gathers); with
    ``rank0_only`` the other ranks get None."""
    state = module.state_dict()
    for prefix, moe in _sharded_experts(module):
        for name, param in moe.experts.named_parameters(recurse=False):
            state[f"{prefix}.{name}"] = _gather_experts(param, moe)
    if rank0_only and dist.get_rank() != 0:
        return None
    return state


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a one-process state dict (full expert weights) into an expert-parallel
    module: each rank keeps its own experts' rows. Strict, like load_state_dict."""
    local = dict(state)
    for prefix, moe in _sharded_experts(module):
        for name, _ in moe.experts.named_parameters(recurse=False):
            key = f"{prefix}.{name}"
            if key in local:
                local[key] = _local_experts(local[key], moe, key)
    module.load_state_dict(local, strict=True)


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in the order of the integer keys of optimizer.state_dict()['state']."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                              rank0_only: bool = False) -> dict[str, Any] | None:
    """optimizer.state_dict() as one process would have it: the per-parameter state
    tensors of sharded expert weights (e.g. AdamW's exp_avg, exp_avg_sq) gathered
    to [E, ...]. Every rank must call it, with the optimizer built over the module
    after apply_expert_parallel, each parameter with state on every rank or on none."""
    state = optimizer.state_dict()
    sharded = _sharded_parameters(module)
    for index, param in enumerate(_optimizer_parameters(optimizer)):
        moe = sharded.get(id(param))
        if moe is None or index not in state["state"]:
            continue
        state["state"][index] = {
            key: _gather_experts(value, moe)
            if torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in state["state"][index].items()}
    if rank0_only and dist.get_rank() != 0:
        return None
    return state


def load_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any]) -> None:
    """Load a one-process optimizer state dict into the optimizer of an
    expert-parallel module: each rank keeps its own experts' rows."""
    sharded = _sharded_parameters(module)
    per_param = dict(state["state"])
    for index, param in enumerate(_optimizer_parameters(optimizer)):
        moe = sharded.get(id(param))
        if moe is None or index not in per_param:
            continue
        per_param[index] = {
            key: _local_experts(value, moe, f"optimizer state {index}.{key}")
            if torch.is_tensor(value) and value.dim() == param.dim() else value
            for key, value in per_param[index].items()}
    optimizer.load_state_dict({**state, "state": per_param})


def sharded_state_dict(module: nn.Module) -> dict[str, Any]:
    """module.state_dict() with every sharded expert weight as a DTensor sharded on
    dim 0 over its expert-parallel group: pass it to torch.distributed.checkpoint.save
    (each rank writes its own experts) or .load (any world size; then call
    load_sharded_state_dict). A module without expert parallelism gives its plain
    state dict, which DCP fills from a checkpoint saved sharded."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    state = module.state_dict()
    for prefix, moe in _sharded_experts(module):
        if moe.dispatcher.slot_of_expert is not None:
            raise ValueError(f"{prefix}: sharded_state_dict needs contiguous expert blocks without "
                             f"copies, not the placement {moe.dispatcher.placement}; save "
                             "full_state_dict instead")
        group = moe.dispatcher.group if moe.dispatcher.group is not None else dist.group.WORLD
        for name, param in moe.experts.named_parameters(recurse=False):
            mesh = DeviceMesh.from_group(group, param.device.type)
            state[f"{prefix}.{name}"] = DTensor.from_local(param.detach(), mesh, [Shard(0)],
                                                           run_check=False)
    return state


def load_sharded_state_dict(module: nn.Module, state: dict[str, Any]) -> None:
    """Load a state dict filled by torch.distributed.checkpoint.load (from
    sharded_state_dict) into the module: DTensors by their local shard."""
    from torch.distributed.tensor import DTensor

    local = {key: value.to_local() if isinstance(value, DTensor) else value
             for key, value in state.items()}
    module.load_state_dict(local, strict=True)
