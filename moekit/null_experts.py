"""Zero-computation ("null") experts (MoE++, Jin et al. 2024, arXiv:2410.07348).

The router scores E + N slots: slots [0, E) are the real experts, slots [E, E + N) null
experts that run no FFN. A token that picks a null slot uses one real expert fewer; its
combine weight multiplies zero (kind "zero") or the token's input (kind "copy", MoE++'s copy
expert). The dispatcher sees only the real assignments, so null slots make no expert rows
(the FLOPs saved), take no capacity and are never dropped.

Letters: T tokens, D model dim, K choices per token, E real experts, N null experts.
"""

from __future__ import annotations

import torch

from moekit.routing import Routing, expert_counts


def null_mask(ids_TK: torch.Tensor, num_experts: int,
              assignment_mask_TK: torch.Tensor | None = None) -> torch.Tensor:
    """bool [T, K]: the assignments (per assignment_mask_TK, if given) to a null slot (id >= E)."""
    null_TK = ids_TK >= num_experts
    return null_TK if assignment_mask_TK is None else null_TK & assignment_mask_TK


def real_expert_routing(routing: Routing, num_experts: int) -> Routing:
    """The routing the dispatcher runs: null assignments become non-assignments (the
    assignment_mask), their ids 0 so that every id indexes an expert. Weights, probabilities
    and logits are routing's own (the dispatcher reads only the weights of real ones)."""
    null_TK = routing.expert_indices >= num_experts
    real_TK = ~null_TK if routing.assignment_mask is None else routing.assignment_mask & ~null_TK
    ids_TK = routing.expert_indices.masked_fill(null_TK, 0)
    return routing._replace(expert_indices=ids_TK, assignment_mask=real_TK)


def copy_expert_output(x_TD: torch.Tensor, routing: Routing, num_experts: int) -> torch.Tensor:
    """[T, D] in x's dtype: each token's input times the summed combine weights of its null
    assignments (MoE++'s copy expert, E(x) = x). Differentiable in x and the weights."""
    null_TK = null_mask(routing.expert_indices, num_experts, routing.assignment_mask)
    weight_T = (routing.expert_weights * null_TK).sum(dim=1)
    return (x_TD * weight_T.unsqueeze(1)).to(x_TD.dtype)


def null_counts(ids_TK: torch.Tensor, num_experts: int, num_null_experts: int,
                assignment_mask_TK: torch.Tensor | None = None) -> torch.Tensor:
    """[N] int64 assignments to each null slot."""
    null_TK = null_mask(ids_TK, num_experts, assignment_mask_TK)
    return expert_counts((ids_TK - num_experts).clamp_min(0), num_null_experts, null_TK)


def real_balance_view(probs_TE: torch.Tensor, ids_TK: torch.Tensor,
                      assignment_mask_TK: torch.Tensor | None, num_experts: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs [T, E], ids [T, K], assignment mask [T, K]) of the real experts only, for a
    balance loss over them (balance_null_experts=False): f counts real assignments, P the
    router's probability of each real expert (not renormalised over the real ones)."""
    real_TK = ids_TK < num_experts
    if assignment_mask_TK is not None:
        real_TK = real_TK & assignment_mask_TK
    return probs_TE[:, :num_experts], ids_TK.masked_fill(~real_TK, 0), real_TK
