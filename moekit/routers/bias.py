"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024).

A per-expert bias b is added to the scores for selection only; once per
optimizer step, b_i += rate * sign(mean_load - load_i) over the loads routed
since the previous step (moekit.balancing), so an overloaded expert becomes
less attractive and an idle one more. Combine weights never see b.
"""

from __future__ import annotations

import torch


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing
    it (torch.utils.checkpoint, either mode). Its routing was recorded by the first forward."""
    return torch._C._current_graph_task_id() != -1


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """In place: bias += rate * sign(mean(load) - load)."""
    expert_bias_E.add_(torch.sign(load_E.mean() - load_E).to(expert_bias_E.dtype), alpha=rate)
