"""Router losses. Each returns an unweighted scalar; the layer applies the weight once.

Both are safe at T = 0 (they return 0 still connected to the router graph).
"""

from __future__ import annotations

import torch

from moekit.routing import expert_counts


def load_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch Transformer, eq. 4, generalised to top-k).

    f_i: fraction of the T*k assignments routed to expert i (before any drop;
    not differentiable). P_i: mean router probability of expert i over tokens.
    Equals 1 at perfect balance and E when every token goes to one expert (k=1).
    probs_TE: [T, E]; ids_TK: [T, K] int64. Differentiable in probs_TE.
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = expert_counts(ids_TK, num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / max(ids_TK.numel(), 1)
    mean_prob_E = probs_TE.sum(dim=0) / max(num_tokens, 1)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022, eq. 5).

    logits_TE: [T, E]. Differentiable.
    """
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)
