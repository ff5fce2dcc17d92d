"""How a training run spreads over processes: one, or data + expert parallel over a group.

With W processes (torchrun), every rank draws the same global batch from the
same data generator and trains on its 1/W slice of the sequences; the experts
are sharded over the ranks (moekit.parallel) and everything else is replicated.
Each rank back-propagates its mean loss divided by W plus its share of the aux
losses, so after the replicated gradients are summed every gradient equals the
one-process gradient on the whole global batch. Checkpoints hold the gathered
one-process weights and optimizer state: a run saved at W processes resumes at
any number, or in one process, and `moekit generate` reads it as is.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError


class SingleProcess:
    """The default: the whole batch in this process, nothing to communicate."""

    world_size = 1
    rank = 0
    is_main = True

    def check_batch_size(self, batch_size: int) -> None:
        """Raise if the global batch does not split evenly over the ranks."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the model's experts over the ranks (in place)."""
        return model

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows [B / W, ...] of a global batch [B, ...]."""
        return batch

    def local_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter or gradient (all of it unless FSDP shards it)."""
        return tensor

    def finish_gradients(self, model: nn.Module) -> None:
        """Make every gradient the gradient of the global batch's loss."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip by the global gradient norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over the ranks."""
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the ranks."""
        return tensor

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The one-process state dict (on the main rank; None elsewhere)."""
        return model.state_dict()

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer
                                  ) -> dict[str, Any] | None:
        return optimizer.state_dict()

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state, strict=True)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def broadcast(self, value: Any) -> Any:
        """The main rank's value (a picklable object) on every rank."""
        return value

    def barrier(self) -> None:
        pass


class DataExpertParallel(SingleProcess):
    """Data + expert parallel over the default process group (torch.distributed must
    be initialised, e.g. by `moekit train --expert-parallel` under torchrun).
    ``placement``: which experts each rank holds, as apply_expert_parallel takes it
    (e.g. moekit.placement.read_placement_file); default contiguous blocks."""

    def __init__(self, placement: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("data + expert parallel training needs torch.distributed initialised; "
                             "launch with torchrun --nproc-per-node N -m moekit train --expert-parallel")
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        for name, layer in _placement_layers(placement):
            _check_device_count(name, getattr(layer, "experts_per_device", layer), self.world_size,
                                f"{self.world_size} processes")
        self.placement = placement

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise UsageError(f"batch_size {batch_size} must be divisible by the number of processes "
                             f"({self.world_size}): every rank trains on batch_size / processes sequences")

    def prepare(self, model: nn.Module) -> nn.Module:
        from moekit.parallel import apply_expert_parallel

        if not getattr(model, "moe_layers", None):
            return model
        return apply_expert_parallel(model, placement=self.placement)

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        per_rank = batch.shape[0] // self.world_size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def finish_gradients(self, model: nn.Module) -> None:
        from moekit.parallel import all_reduce_replicated_grads

        all_reduce_replicated_grads(model)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip by the norm of the one-process gradient: each rank's sharded expert rows
        counted once over the ranks (of a replicated expert, only the first copy: after
        finish_gradients its copies hold the same summed gradient), the replicated
        parameters once."""
        from moekit.layer import MoE
        from moekit.parallel import first_copy_rows, is_expert_parallel

        counted_rows = {id(param): first_copy_rows(moe) for moe in model.modules() if isinstance(moe, MoE)
                        for param in moe.experts.parameters(recurse=False)}
        named = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
        sharded = [p.grad[counted_rows[id(p)]] for name, p in named if is_expert_parallel(name)]
        replicated = [p.grad for name, p in named if not is_expert_parallel(name)]
        sharded_sq = torch.nn.utils.get_total_norm(sharded).square() if sharded else torch.zeros(())
        dist.all_reduce(sharded_sq)
        replicated_sq = torch.nn.utils.get_total_norm(replicated).square() if replicated \
            else torch.zeros(())
        total = (sharded_sq + replicated_sq).sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters()], max_norm, total)
        return float(total)

    def mean(self, values: list[float]) -> list[float]:
        packed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(packed)
        return (packed / self.world_size).tolist()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from moekit.parallel import full_state_dict

        return full_state_dict(model, rank0_only=True)

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer
                                  ) -> dict[str, Any] | None:
        from moekit.parallel import full_optimizer_state_dict

        return full_optimizer_state_dict(model, optimizer, rank0_only=True)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from moekit.parallel import load_full_state_dict

        load_full_state_dict(model, state)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        from moekit.parallel import load_full_optimizer_state_dict

        load_full_optimizer_state_dict(model, optimizer, state)

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


class FullyShardedExpertParallel(DataExpertParallel):
    """Data + expert parallel with FSDP2 on a 2-D ("dp", "ep") mesh of the default process
    group (moekit.parallel.fsdp): every rank trains on its 1/W of each batch; the experts
    are sharded over ``expert_parallel_size`` ranks (default all W) and that shard over the
    W / ep "dp" ranks; every other parameter is sharded over all W ranks. Parameters,
    gradients and optimizer state are DTensors; checkpoints hold one-process tensors as
    DataExpertParallel's do. ``placement`` as DataExpertParallel's, without copies."""

    def __init__(self, expert_parallel_size: int | None = None, placement: Any = None,
                 device_type: str = "cpu") -> None:
        super().__init__()  # the placement is over ep devices, checked below, not over all W
        ep = self.world_size if expert_parallel_size is None else expert_parallel_size
        if ep < 1 or self.world_size % ep:
            raise UsageError(f"--expert-parallel-size {ep} must divide the number of processes "
                             f"({self.world_size}): the experts of a layer are sharded over ep "
                             "processes, repeated over processes / ep")
        for name, layer in _placement_layers(placement):
            _check_fsdp_placement(name, getattr(layer, "experts_per_device", layer), ep)
        self.placement = placement
        from torch.distributed.device_mesh import init_device_mesh

        from moekit.parallel.fsdp import MESH_DIMS

        self.expert_parallel_size = ep
        self.mesh = init_device_mesh(device_type, (self.world_size // ep, ep), mesh_dim_names=MESH_DIMS)

    def prepare(self, model: nn.Module) -> nn.Module:
        from moekit.parallel import apply_fsdp_expert_parallel

        if not getattr(model, "moe_layers", None):
            raise UsageError("--fsdp shards the experts of MoE blocks, and this model has none; "
                             "train a dense model with --expert-parallel alone (data parallel)")
        return apply_fsdp_expert_parallel(model, self.mesh, placement=self.placement)

    def local_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def finish_gradients(self, model: nn.Module) -> None:
        """Nothing: FSDP's reduce-scatter has already summed every gradient."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        # every element of every parameter lives on exactly one rank (no copies), so the
        # squared norms of the local shards sum over all ranks to the global squared norm
        grads = [self.local_shard(p.grad) for p in model.parameters() if p.grad is not None]
        squared = torch.nn.utils.get_total_norm(grads).square() if grads else torch.zeros(())
        dist.all_reduce(squared)
        total = squared.sqrt()
        if math.isfinite(max_norm):
            coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as clip_grads_with_norm_
            for grad in grads:
                grad.mul_(coefficient.to(grad.device))
        return float(total)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from moekit.parallel import fsdp_full_state_dict

        return fsdp_full_state_dict(model, rank0_only=True)

    def full_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer
                                  ) -> dict[str, Any] | None:
        from moekit.parallel import fsdp_full_optimizer_state_dict

        return fsdp_full_optimizer_state_dict(model, optimizer, rank0_only=True)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from moekit.parallel import load_fsdp_full_state_dict

        load_fsdp_full_state_dict(model, state)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        from moekit.parallel import load_fsdp_full_optimizer_state_dict

        load_fsdp_full_optimizer_state_dict(model, optimizer, state)


def _placement_layers(placement: Any) -> list[tuple[str, Any]]:
    """[(layer name, its placement)] of a placement given per layer (a dict) or for all."""
    layers = placement if isinstance(placement, dict) else {"every layer": placement}
    return [(name, layer) for name, layer in layers.items() if layer is not None]


def _check_device_count(layer: str, experts_per_device: Any, count: int, over: str) -> None:
    """UsageError unless the placement (expert ids per device) is over ``count`` devices
    (``over`` says what they are: "4 processes", "--expert-parallel-size 2")."""
    devices = len(list(experts_per_device))
    if devices != count:
        raise UsageError(f"the placement of {layer} is over {devices} devices, the experts over "
                         f"{over}; plan it with `moekit plan-placement --devices {count}`")


def _check_fsdp_placement(layer: str, experts_per_device: Any, expert_parallel_size: int) -> None:
    """UsageError unless the placement (expert ids per device) is over expert_parallel_size
    devices, without copies (each expert id once)."""
    devices = [list(experts) for experts in experts_per_device]
    _check_device_count(layer, devices, expert_parallel_size,
                        f"--expert-parallel-size {expert_parallel_size}")
    ids = [e for experts in devices for e in experts]
    if len(set(ids)) != len(ids):
        raise UsageError(f"the placement of {layer} gives copies of experts ({devices}): --fsdp "
                         "needs a placement without copies; plan with --replicas 0")


def join_torchrun_group(device: torch.device) -> torch.device:
    """Join the process group torchrun set up: gloo on CPU, NCCL on CUDA with one GPU
    per local rank -> this rank's device. Call under torchrun (WORLD_SIZE is set)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device
