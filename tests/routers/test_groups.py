"""Group-limited routing: experts only from each token's best topk_groups groups."""

from __future__ import annotations

import pytest
import torch

from moekit.routers.groups import group_limited_scores
from moekit.routers.topk import route_topk
from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference


@pytest.mark.parametrize("seed", range(5))
def test_chosen_experts_lie_in_the_best_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    E, G, topk_groups, k = 16, 4, 2, 3
    logits = torch.randn(50, E, generator=gen)
    r = route_topk(logits, k, "sigmoid", True, 1.0, None, G, topk_groups)
    scores = logits.sigmoid()
    group_scores = scores.view(50, G, E // G).topk(2, dim=-1).values.sum(-1)
    best_groups = group_scores.topk(topk_groups, dim=-1).indices
    for t in range(50):
        groups = {e // (E // G) for e in r.expert_indices[t].tolist()}
        assert groups <= set(best_groups[t].tolist())
        allowed = [e for g in best_groups[t].tolist() for e in range(g * 4, g * 4 + 4)]
        expected = sorted(allowed, key=lambda e: -scores[t, e].item())[:k]
        assert r.expert_indices[t].tolist() == expected


def test_masking_leaves_allowed_scores_untouched():
    select = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5, 0.4]])
    masked = group_limited_scores(select, num_groups=3, topk_groups=1)
    assert masked.tolist()[0][:2] == pytest.approx([0.9, 0.8])
    assert torch.isinf(masked[0, 2:]).all()
    assert group_limited_scores(select, 1, 1) is select


@pytest.mark.parametrize("fields", [dict(score_func="sigmoid", bias_update_rate=0.01),
                                    dict(score_func="softmax", normalize_topk=False)])
def test_layer_matches_reference(fields):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=8, top_k=2, num_groups=4, topk_groups=2,
                         **fields)
    check_against_reference(moe, 19)
