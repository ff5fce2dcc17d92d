"""Expert-choice routing: every expert takes exactly C tokens, weights are the scores."""

from __future__ import annotations

import random

import pytest
import torch

from moekit import MoEConfig
from moekit.routers import build_router
from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference


@pytest.mark.parametrize("seed", range(10))
def test_each_expert_takes_exactly_capacity_tokens(seed):
    rnd = random.Random(seed)
    E = rnd.randint(1, 9)
    T, k = rnd.randint(0, 40), rnd.randint(1, E)
    factor = rnd.choice([None, 0.5, 1.0, 2.0])
    cfg = MoEConfig(dim=6, expert_dim=4, num_experts=E, top_k=k, router="expert_choice",
                    capacity_factor=factor)
    router = build_router(cfg)
    x = torch.randn(T, 6)
    r = router(x)
    C = router.capacity(T)
    assert C <= T
    mask = r.assignment_mask
    assert mask.sum(0).tolist() == [C] * E
    scores = (x @ router.weight.t()).softmax(-1)
    for e in range(E):  # the C best tokens of each expert
        chosen = set(mask[:, e].nonzero().flatten().tolist())
        assert chosen == set(scores[:, e].topk(C).indices.tolist())
    torch.testing.assert_close(r.expert_weights, scores * mask)
    assert (r.expert_weights >= 0).all()


@pytest.mark.parametrize("num_tokens", [0, 1, 9, 33])
@pytest.mark.parametrize("fields", [dict(), dict(capacity_factor=0.5, score_func="sigmoid"),
                                    dict(capacity_factor=2.0, route_scale=2.0, bias=True)])
def test_layer_matches_reference(num_tokens, fields):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, router="expert_choice",
                         **fields)
    aux = check_against_reference(moe, num_tokens)
    assert aux.dropped_fraction.item() == 0.0


def test_eval_uses_the_same_batch_rule():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1, router="expert_choice")
    x = torch.randn(12, 8)
    _, train_aux = moe(x)
    moe.eval()
    _, eval_aux = moe(x)
    assert torch.equal(train_aux.assignment_mask, eval_aux.assignment_mask)
    assert eval_aux.tokens_per_expert.tolist() == [3, 3, 3, 3]
