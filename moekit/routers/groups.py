"""Group-limited routing (DeepSeek-V3's node-limited routing).

Experts form G equal groups; each token keeps the topk_groups groups whose
two best selection scores sum highest, and may only pick experts inside them.
"""

from __future__ import annotations

import torch


def group_limited_scores(select_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """select_TE [T, E] with experts outside each token's chosen groups set to -inf.

    Not differentiable (used for selection only).
    """
    if num_groups == 1:
        return select_TE
    num_tokens, num_experts = select_TE.shape
    per_group = num_experts // num_groups
    grouped_TGS = select_TE.view(num_tokens, num_groups, per_group)
    group_score_TG = grouped_TGS.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    chosen_TG = group_score_TG.topk(topk_groups, dim=-1).indices
    allowed_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, chosen_TG, True)
    allowed_TE = allowed_TG.repeat_interleave(per_group, dim=1)
    return select_TE.masked_fill(~allowed_TE, float("-inf"))
