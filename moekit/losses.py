"""Router losses. Each returns an unweighted scalar; the layer applies the weight once.

All are safe at T = 0 (they return 0 still connected to the router graph).
"""

from __future__ import annotations

import torch

from moekit.routing import expert_counts


def load_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor,
                      assignment_mask_TK: torch.Tensor | None = None,
                      global_counts_E: torch.Tensor | None = None,
                      global_tokens: int | None = None) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch Transformer, eq. 4, generalised to top-k).

    f_i: fraction of the assignments routed to expert i (before any drop; not
    differentiable). P_i: mean router probability of expert i over tokens.
    Equals 1 at perfect balance and E when every token goes to one expert (k=1).
    probs_TE: [T, E]; ids_TK: [T, K] int64; assignment_mask_TK: [T, K] bool
    slots that are assignments (None: all). Differentiable in probs_TE.

    Split over ranks (expert or data parallel): pass the all-reduced counts
    [E] and token count; then this rank's term uses the global f and its own
    tokens' share of the global P, so the terms of all ranks sum to the loss on
    all tokens, and so do their gradients.
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = expert_counts(ids_TK, num_experts, assignment_mask_TK)
    if global_counts_E is not None:
        counts_E = global_counts_E
        num_tokens = global_tokens
    fraction_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp_min(1)
    mean_prob_E = probs_TE.sum(dim=0) / max(num_tokens, 1)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def sequence_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, sequence_T: torch.Tensor,
                          num_sequences: int,
                          assignment_mask_TK: torch.Tensor | None = None,
                          global_sequences: int | None = None) -> torch.Tensor:
    """Mean over sequences of E * sum_i f_i * P_i, with f and P taken within each
    sequence (DeepSeek-V3's sequence-wise balance loss, eq. 17-20, in the same
    normalisation as load_balance_loss). sequence_T: [T] int64 sequence index of
    each token in [0, num_sequences); empty sequences are skipped. With
    ``global_sequences`` (the non-empty sequences of all ranks, expert parallel)
    the sum is divided by it, so the ranks' terms sum to the mean over all.
    """
    num_experts = probs_TE.shape[1]
    slot_SE = (sequence_T[:, None] * num_experts + ids_TK).reshape(-1)
    mask = None if assignment_mask_TK is None else assignment_mask_TK.reshape(-1)
    counts_SE = expert_counts(slot_SE, num_sequences * num_experts, mask).view(num_sequences, num_experts)
    tokens_S = expert_counts(sequence_T, num_sequences).to(probs_TE.dtype)
    prob_sum_SE = probs_TE.new_zeros(num_sequences, num_experts).index_add(0, sequence_T, probs_TE)
    fraction_SE = counts_SE.to(probs_TE.dtype) / counts_SE.sum(1, keepdim=True).clamp_min(1)
    mean_prob_SE = prob_sum_SE / tokens_S.clamp_min(1)[:, None]
    per_sequence_S = num_experts * (fraction_SE * mean_prob_SE).sum(1)
    present_S = tokens_S > 0
    count = present_S.sum().clamp_min(1) if global_sequences is None else max(global_sequences, 1)
    return (per_sequence_S * present_S).sum() / count


def nonempty_sequences(sequence_T: torch.Tensor, num_sequences: int) -> int:
    """How many of the num_sequences sequences hold at least one token."""
    return int((expert_counts(sequence_T, num_sequences) > 0).sum())


def router_z_loss(logits_TE: torch.Tensor, global_tokens: int | None = None) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022, eq. 5).

    logits_TE: [T, E]. Differentiable. With ``global_tokens`` (split over
    ranks) the sum is divided by it, so the ranks' terms sum to the mean.
    """
    num_tokens = logits_TE.shape[0] if global_tokens is None else global_tokens
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(num_tokens, 1)
