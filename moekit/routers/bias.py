"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024).

A per-expert bias b is added to the scores for selection only; after each
training step, b_i += rate * sign(mean_load - load_i), so an overloaded expert
becomes less attractive and an idle one more. Combine weights never see b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.routing import expert_counts


def global_expert_load(ids_TK: torch.Tensor, num_experts: int,
                       mask_TK: torch.Tensor | None = None) -> torch.Tensor:
    """[E] float32 assignments per expert, summed over all ranks when
    torch.distributed is initialised, so every rank sees the same load."""
    load_E = expert_counts(ids_TK, num_experts, mask_TK).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load_E)
    return load_E


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """In place: bias += rate * sign(mean(load) - load)."""
    expert_bias_E.add_(torch.sign(load_E.mean() - load_E).to(expert_bias_E.dtype), alpha=rate)
