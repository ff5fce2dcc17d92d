"""Expert capacity and the token-dropping policies.

Capacity (GShard, Switch Transformer): C = max(min_capacity, ceil(factor * T * k / E)),
clamped to T since an expert can take each token at most once.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from moekit.config import DROP_POLICIES
from moekit.routing import expert_counts


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: float, min_capacity: int = 0) -> int:
    """Assignments one expert may take. Exact rational math, so that
    1.1 * 10 tokens is capacity 11, not 12 from a float rounding error."""
    if capacity_factor <= 0 or not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
    numerator, denominator = _decimal_ratio(capacity_factor)
    exact_ceil = -(-numerator * num_tokens * top_k // (denominator * num_experts))
    return min(num_tokens, max(min_capacity, exact_ceil))


@torch.compiler.assume_constant_result
def _decimal_ratio(value: float) -> tuple[int, int]:
    """value as the ratio of integers its shortest decimal form says (1.1 -> 11 / 10)."""
    exact = Fraction(repr(float(value)))
    return exact.numerator, exact.denominator


def capacity_keep_mask(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                       capacity: int, drop_policy: str = "position",
                       assignment_mask_TK: torch.Tensor | None = None,
                       sequence_T: torch.Tensor | None = None,
                       num_sequences: int = 1,
                       token_scores_T: torch.Tensor | None = None) -> torch.Tensor:
    """Which assignments survive capacity: bool [T, K], True = kept.

    Slots outside assignment_mask_TK (if given) are not assignments: they take
    no capacity and are never kept. With sequence_T ([T] int64, each token's
    sequence in [0, num_sequences)), each sequence has its own capacity per expert.
    Each expert keeps its first ``capacity`` assignments in priority order:
    - "position": all first choices before any second choice, then earlier
      tokens first (GShard, Switch);
    - "score": highest combine weight first, ties broken by position order;
    - "token_score": all first choices before any second choice, then tokens by
      token_scores_T [T] (each token's highest router probability), highest first, ties by
      position (batch-prioritized routing: GShard, NLLB-MoE).
    Not differentiable (a mask).
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    num_tokens, top_k = ids_TK.shape
    if sequence_T is not None:  # expert e of sequence s queues as expert s * E + e
        ids_TK = ids_TK + sequence_T.unsqueeze(1) * num_experts
        num_experts *= num_sequences
    # Flatten choice-major: assignment j * T + t, which is the position order.
    ids_A = ids_TK.t().reshape(-1)
    if assignment_mask_TK is not None:  # non-assignments queue for a sentinel expert E
        ids_A = torch.where(assignment_mask_TK.t().reshape(-1), ids_A, num_experts)
    priority_A = torch.arange(ids_A.numel(), device=ids_A.device)
    if drop_policy == "score":
        priority_A = torch.argsort(-weights_TK.detach().t().reshape(-1), stable=True)
    elif drop_policy == "token_score":
        if token_scores_T is None:
            raise ValueError("drop_policy='token_score' needs each token's score (token_scores_T)")
        order_T = torch.argsort(-token_scores_T.detach(), stable=True)
        choices_K1 = torch.arange(top_k, device=ids_A.device).unsqueeze(1)
        priority_A = (choices_K1 * num_tokens + order_T.unsqueeze(0)).reshape(-1)
    ids_by_priority = ids_A[priority_A]
    by_expert = torch.argsort(ids_by_priority, stable=True)
    counts_E = expert_counts(ids_A, num_experts + 1)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_ids = ids_by_priority[by_expert]
    rank_in_expert = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E[sorted_ids]
    keep_by_priority = torch.empty_like(ids_A, dtype=torch.bool)
    keep_by_priority[by_expert] = (rank_in_expert < capacity) & (sorted_ids < num_experts)
    keep_A = torch.empty_like(keep_by_priority)
    keep_A[priority_A] = keep_by_priority
    return keep_A.view(top_k, num_tokens).t()
