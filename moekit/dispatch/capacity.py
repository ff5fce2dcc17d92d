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
    """Each expert takes at most C = expert_capacity(T, E, K, factor, min) assignments,
    or a fixed C (fixed_capacity); per sequence when per_sequence (then C is fixed)."""

    def __init__(self, num_experts: int, capacity_factor: float | None, min_capacity: int = 0,
                 drop_policy: str = "position", fixed_capacity: int | None = None,
                 per_sequence: bool = False) -> None:
        super().__init__(num_experts)
        if (capacity_factor is None) == (fixed_capacity is None):
            raise ValueError("give capacity_factor or fixed_capacity, exactly one: got "
                             f"{capacity_factor} and {fixed_capacity}")
        if per_sequence and fixed_capacity is None:
            raise ValueError("per_sequence capacity needs fixed_capacity")
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_policy = drop_policy
        self.fixed_capacity = fixed_capacity
        self.per_sequence = per_sequence

    def capacity(self, num_tokens: int, top_k: int) -> int:
        if self.fixed_capacity is not None:
            return self.fixed_capacity
        return expert_capacity(num_tokens, self.num_experts, top_k,
                               self.capacity_factor, self.min_capacity)

    def keep_mask(self, routing: Routing, sequence_T: torch.Tensor | None = None,
                  num_sequences: int = 1) -> torch.Tensor:
        """bool [T, K]; sequence_T ([T], each token's sequence) is needed when per_sequence."""
        if self.per_sequence and sequence_T is None:
            raise ValueError("per-sequence capacity needs each token's sequence (sequence_T)")
        capacity = self.capacity(routing.num_tokens, routing.top_k)
        return capacity_keep_mask(routing.expert_indices, routing.expert_weights,
                                  self.num_experts, capacity, self.drop_policy,
                                  routing.assignment_mask,
                                  sequence_T if self.per_sequence else None, num_sequences)
