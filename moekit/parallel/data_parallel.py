"""Data-parallel replicas of MoE layers whose losses see the routing of every rank as one batch."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from moekit.dispatch import LocalDispatcher
from moekit.layer import MoE


def share_balance_load(module: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every replicated MoE layer in ``module`` take f (and the token counts of its
    losses) over all ranks of ``group`` (default: every rank): one all_reduce of [E + 2]
    counts per training forward. Each rank's aux loss is then its share of the loss over all
    ranks' tokens, so the ranks' losses sum to the loss of the concatenated batch and so do
    their gradients (DDP averages gradients: multiply aux.loss by the world size to train on
    the global one). Expert-parallel layers already share over their group and are left
    alone. Returns how many layers now share."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("share_balance_load needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    shared = 0
    for layer in module.modules():
        if isinstance(layer, MoE) and isinstance(layer.dispatcher, LocalDispatcher):
            layer.dispatcher.balance_group = dist.group.WORLD if group is None else group
            shared += 1
    return shared
