"""Capacity-limited dispatch: the local dispatcher, dropping over-capacity assignments.

Dropped assignments contribute zero and get zero gradient through the experts;
surviving weights are not renormalised (GShard, Switch Transformer), unless
renormalize_kept (NLLB-MoE): then a token's kept weights are rescaled to the sum of all its k.
"""

from __future__ import annotations

import torch

from moekit.capacity import capacity_keep_mask, expert_capacity
from moekit.dispatch.local import LocalDispatcher
from moekit.routing import Routing


class CapacityDispatcher(LocalDispatcher):
    """Each expert takes at most C = expert_capacity(T, E, K, factor, min) assignments,
    or a fixed C (fixed_capacity), or C = ceil(token_fraction * T); per sequence when
    per_sequence (then C is fixed). renormalize_kept: see the module doc."""

    def __init__(self, num_experts: int, capacity_factor: float | None, min_capacity: int = 0,
                 drop_policy: str = "position", fixed_capacity: int | None = None,
                 per_sequence: bool = False, renormalize_kept: bool = False,
                 token_fraction: float | None = None) -> None:
        super().__init__(num_experts)
        given = [v for v in (capacity_factor, fixed_capacity, token_fraction) if v is not None]
        if len(given) != 1:
            raise ValueError("give capacity_factor, fixed_capacity or token_fraction, exactly "
                             f"one: got {capacity_factor}, {fixed_capacity} and {token_fraction}")
        if per_sequence and fixed_capacity is None:
            raise ValueError("per_sequence capacity needs fixed_capacity")
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_policy = drop_policy
        self.fixed_capacity = fixed_capacity
        self.per_sequence = per_sequence
        self.renormalize_kept = renormalize_kept
        self.token_fraction = token_fraction

    def capacity(self, num_tokens: int, top_k: int) -> int:
        if self.fixed_capacity is not None:
            return self.fixed_capacity
        if self.token_fraction is not None:  # ceil(fraction * T), as one expert of k = 1
            return expert_capacity(num_tokens, 1, 1, self.token_fraction)
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
                                  sequence_T if self.per_sequence else None, num_sequences,
                                  token_scores(routing))


def token_scores(routing: Routing) -> torch.Tensor:
    """[T]: each token's highest router probability, the priority of drop_policy="token_score"."""
    return routing.router_probs.detach().amax(dim=-1)
