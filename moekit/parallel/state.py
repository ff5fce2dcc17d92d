"""State of an expert-parallel module in one-process form, and resharding checkpoints.

- full_state_dict / load_full_state_dict: gather the sharded expert weights into
  the state dict one process would have, and shard one back.
- full_optimizer_state_dict / load_full_optimizer_state_dict: the same for an
  optimizer's per-parameter state (e.g. AdamW's moments), so a checkpoint does not
  depend on the number of processes that wrote it.
- sharded_state_dict / load_sharded_state_dict: the expert weights as DTensors
  sharded on the expert dim in expert order, each expert once whatever the
  placement (copies included), for torch.distributed.checkpoint (DCP), which then
  saves each rank's shard in parallel and reshards on load at any world size.

Shape letters: E experts, S expert slots per rank (E / W without copies), B the
experts of a rank's expert-order block, X the rest of an expert weight's shape.
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


def first_copy_rows(moe: MoE) -> list[int]:
    """The rows of this rank's expert weights [S, ...] that hold an expert's first copy
    (first in the rank-major placement; every row without copies, and every row of a
    layer that is not expert parallel). Over the group they hold each expert once:
    the rows a checkpoint writes and a gradient norm counts."""
    dispatcher = moe.dispatcher
    if not isinstance(dispatcher, AllToAllDispatcher):
        return list(range(moe.config.num_experts))
    return sorted(row for rank, row in _first_copies(dispatcher) if rank == dispatcher.rank)


def _first_copies(dispatcher: AllToAllDispatcher) -> list[tuple[int, int]]:
    """[E] (rank, row) of each expert's first copy."""
    return [divmod(slot, dispatcher.num_local_experts) for slot in dispatcher.slots_EC[:, 0].tolist()]


def _block_size(num_experts: int, world_size: int) -> int:
    """Experts per rank of a DTensor [E, ...] sharded on dim 0: ceil(E / W), as torch.chunk
    splits (the last ranks' blocks shorter or empty). Expert e is row e % size of rank e // size."""
    return -(-num_experts // world_size)


def _block_rows(num_experts: int, world_size: int, rank: int) -> int:
    """How many experts ``rank``'s expert-order block holds."""
    size = _block_size(num_experts, world_size)
    return max(0, min(num_experts, (rank + 1) * size) - rank * size)


def _move_rows(rows_SX: torch.Tensor, moves: list[tuple[int, int, int, int]], num_rows: int,
               dispatcher: AllToAllDispatcher) -> torch.Tensor:
    """Rows moved between the ranks of the layer's group, all ranks calling it with the
    same ``moves`` (source rank, source row, destination rank, destination row), each
    destination row of every rank written once -> this rank's [num_rows, ...]. One
    all_to_all_single; a rank sends its rows in (destination rank, destination row)
    order, so it receives them in (source rank, destination row) order."""
    rank, world_size = dispatcher.rank, dispatcher.world_size
    sent = sorted((dst, dst_row, src_row) for src, src_row, dst, dst_row in moves if src == rank)
    received = sorted((src, dst_row) for src, _, dst, dst_row in moves if dst == rank)
    rows_SX = rows_SX.detach()
    send = rows_SX[[src_row for _, _, src_row in sent]].contiguous()
    recv = rows_SX.new_empty(len(received), *rows_SX.shape[1:])
    dist.all_to_all_single(recv, send, [sum(1 for src, _ in received if src == r) for r in range(world_size)],
                           [sum(1 for dst, _, _ in sent if dst == r) for r in range(world_size)],
                           group=dispatcher.group)
    out = rows_SX.new_empty(num_rows, *rows_SX.shape[1:])
    out[[dst_row for _, dst_row in received]] = recv
    return out


def _to_expert_blocks(local_SX: torch.Tensor, moe: MoE) -> torch.Tensor:
    """This rank's expert weights [S, ...] in any placement -> its expert-order block
    [_block_rows, ...], each expert taken from its first copy (all ranks call it)."""
    dispatcher, num_experts = moe.dispatcher, moe.config.num_experts
    size = _block_size(num_experts, dispatcher.world_size)
    moves = [(*first, *divmod(e, size)) for e, first in enumerate(_first_copies(dispatcher))]
    return _move_rows(local_SX, moves, _block_rows(num_experts, dispatcher.world_size, dispatcher.rank),
                      dispatcher)


def _from_expert_blocks(block_BX: torch.Tensor, moe: MoE, key: str) -> torch.Tensor:
    """The inverse of _to_expert_blocks: every copy of an expert gets its row (all ranks call it)."""
    dispatcher, num_experts = moe.dispatcher, moe.config.num_experts
    expected = _block_rows(num_experts, dispatcher.world_size, dispatcher.rank)
    if block_BX.dim() == 0 or block_BX.shape[0] != expected:
        raise ValueError(f"{key} has {tuple(block_BX.shape)} on rank {dispatcher.rank}, expected "
                         f"[{expected}, ...] (its block of experts); is this state from "
                         "sharded_state_dict?")
    size = _block_size(num_experts, dispatcher.world_size)
    moves = [(*divmod(e, size), rank, row) for rank, experts in enumerate(dispatcher.placement)
             for row, e in enumerate(experts)]
    return _move_rows(block_BX, moves, dispatcher.num_local_experts, dispatcher)


def sharded_state_dict(module: nn.Module) -> dict[str, Any]:
    """module.state_dict() with every sharded expert weight as a DTensor [E, ...] sharded
    on dim 0 over its expert-parallel group, each expert once: pass it to
    torch.distributed.checkpoint.save (each rank writes its block of experts) or .load
    (any world size and placement; then call load_sharded_state_dict). Contiguous
    blocks without copies are the parameters themselves; any other placement is first
    moved into blocks in expert order (ceil(E / W) experts per rank), one all-to-all
    per expert weight, each expert from its first copy, so every rank of each group
    must call it. A module without expert parallelism gives its plain state dict,
    which DCP fills from a checkpoint saved sharded."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    state = module.state_dict()
    for prefix, moe in _sharded_experts(module):
        group = moe.dispatcher.group if moe.dispatcher.group is not None else dist.group.WORLD
        for name, param in moe.experts.named_parameters(recurse=False):
            local = param.detach()
            if moe.dispatcher.slot_of_expert is not None:
                local = _to_expert_blocks(local, moe)
            shape = torch.Size((moe.config.num_experts, *param.shape[1:]))
            mesh = DeviceMesh.from_group(group, param.device.type)
            state[f"{prefix}.{name}"] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=shape,
                stride=torch.empty(shape, device="meta").stride())
    return state


def load_sharded_state_dict(module: nn.Module, state: dict[str, Any]) -> None:
    """Load a state dict filled by torch.distributed.checkpoint.load (from
    sharded_state_dict) into the module: DTensors by their local shard, moved to the
    module's placement (every copy of an expert gets its weights; all ranks call it)."""
    from torch.distributed.tensor import DTensor

    local = {key: value.to_local() if isinstance(value, DTensor) else value
             for key, value in state.items()}
    for prefix, moe in _sharded_experts(module):
        if moe.dispatcher.slot_of_expert is None:
            continue
        for name, _ in moe.experts.named_parameters(recurse=False):
            key = f"{prefix}.{name}"
            if key in local:
                local[key] = _from_expert_blocks(local[key], moe, key)
    module.load_state_dict(local, strict=True)
