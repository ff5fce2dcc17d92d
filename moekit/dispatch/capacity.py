"""Capacity-limited dispatch: the local dispatcher, dropping over-capacity assignments.

Dropped assignments contribute zero and get zero gradient through the experts;
surviving weights are not renormalised (GShard, Switch Transformer).
"""

from __future__ import annotations

import torch

from moekit.capacity import capacity_keep_mask, expert_capacity
from moekit.dispatch.local import LocalDispatcher
from moekit.routing import Routing


class CapacityDispatcher(LocalDispatcher):
    """Each expert takes at most C = expert_capacity(T, E, K, factor, min) assignments."""

    def __init__(self, num_experts: int, capacity_factor: float, min_capacity: int = 0,
                 drop_policy: str = "position") -> None:
        super().__init__(num_experts)
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_policy = drop_policy

    def capacity(self, num_tokens: int, top_k: int) -> int:
        return expert_capacity(num_tokens, self.num_experts, top_k,
                               self.capacity_factor, self.min_capacity)

    def keep_mask(self, routing: Routing) -> torch.Tensor:
        capacity = self.capacity(routing.num_tokens, routing.top_k)
        return capacity_keep_mask(routing.expert_indices, routing.expert_weights,
                                  self.num_experts, capacity, self.drop_policy,
                                  routing.assignment_mask)
