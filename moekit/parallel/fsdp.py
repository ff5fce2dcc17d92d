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
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from moekit.layer import MoE
from moekit.parallel.expert_parallel import apply_expert_parallel

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
