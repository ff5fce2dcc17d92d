"""Expert capacity and the drop policies, against hand-computed masks."""

from __future__ import annotations

import random

import pytest
import torch

from moekit.capacity import capacity_keep_mask, expert_capacity
from moekit.config import MoEConfig
from tests.reference import keep_assignments


def test_capacity_formula():
    assert expert_capacity(16, 4, 2, 1.0) == 8          # ceil(1.0 * 16 * 2 / 4)
    assert expert_capacity(10, 1, 1, 1.1) == 10         # 11 exactly, clamped to T = 10
    assert expert_capacity(100, 10, 1, 1.1) == 11       # 1.1 * 100 / 10 is 11, not 12
    assert expert_capacity(10, 8, 1, 0.5) == 1          # ceil(0.625)
    assert expert_capacity(10, 8, 1, 0.5, min_capacity=4) == 4
    assert expert_capacity(3, 2, 2, 50.0) == 3          # capacity > tokens is clamped
    assert expert_capacity(0, 4, 2, 1.0) == 0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_capacity_rejects_bad_factor(bad):
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        expert_capacity(8, 2, 1, bad)


def test_position_policy_by_hand():
    # 4 tokens, k=2, 3 experts, capacity 2.
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
    keep = capacity_keep_mask(ids, weights, 3, capacity=2, drop_policy="position")
    # First choices: e0 gets t0, t1 (t2 dropped); e1 gets t3.
    # Second choices: e1 gets t0 (now full); e2 gets t1; e1 for t2 dropped; e0 for t3 dropped.
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_score_policy_by_hand():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
    keep = capacity_keep_mask(ids, weights, 3, capacity=2, drop_policy="score")
    # e0 candidates: t1 .9, t2 .7, t0 .6, t3 .5 -> keep t1, t2.
    # e1 candidates: t3 .5, t0 .4, t2 .3 -> keep t3, t0.  e2: t1 .1 -> keep.
    assert keep.tolist() == [[False, True], [True, True], [True, False], [True, False]]


def test_token_score_policy_by_hand():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
    scores = torch.tensor([0.5, 0.2, 0.9, 0.4])  # each token's top router probability
    keep = capacity_keep_mask(ids, weights, 3, capacity=2, drop_policy="token_score",
                              token_scores_T=scores)
    # First choices by score t2, t0, t3, t1: e0 keeps t2, t0 (t1 dropped); e1 keeps t3.
    # Then second choices by score: e1 keeps t2 (now full), t0 dropped; e2 keeps t1; e0 full.
    assert keep.tolist() == [[True, False], [False, True], [True, True], [True, False]]
    with pytest.raises(ValueError, match=r"drop_policy='token_score' needs each token's score"):
        capacity_keep_mask(ids, weights, 3, capacity=2, drop_policy="token_score")


@pytest.mark.parametrize("seed", range(20))
def test_keep_mask_matches_hand_loop_on_random_routings(seed):
    rnd = random.Random(seed)
    T, E = rnd.randint(0, 30), rnd.randint(1, 9)
    k = rnd.randint(1, E)
    policy = rnd.choice(["position", "score", "token_score"])
    cfg = MoEConfig(dim=4, expert_dim=4, num_experts=E, top_k=k, drop_policy=policy,
                    capacity_factor=rnd.choice([0.25, 0.5, 1.0, 1.5]), min_capacity=rnd.randint(0, 2))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) \
        if T else torch.zeros(0, k, dtype=torch.int64)
    weights = torch.rand(T, k, generator=gen).round(decimals=1)  # rounding makes ties
    scores = torch.rand(T, generator=gen).round(decimals=1)
    capacity = expert_capacity(T, E, k, cfg.capacity_factor, cfg.min_capacity)
    keep = capacity_keep_mask(ids, weights, E, capacity, policy, token_scores_T=scores)
    assert keep.tolist() == keep_assignments(cfg, ids.tolist(), weights.tolist(),
                                             token_scores=scores.tolist())
    load = torch.zeros(E, dtype=torch.int64).index_add_(0, ids[keep], torch.ones_like(ids[keep]))
    assert max(load.tolist()) <= capacity


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="drop_policy must be one of .* got 'lottery'"):
        capacity_keep_mask(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), 2, 1, "lottery")


@pytest.mark.parametrize("seed", range(10))
def test_per_sequence_keep_mask_matches_hand_loop(seed):
    rnd = random.Random(seed)
    B, S, E = rnd.randint(1, 4), rnd.randint(0, 9), rnd.randint(1, 6)
    k = rnd.randint(1, E)
    policy = rnd.choice(["position", "score", "token_score"])
    cfg = MoEConfig(dim=4, expert_dim=4, num_experts=E, top_k=k, drop_policy=policy,
                    expert_capacity=rnd.randint(1, 3), capacity_scope="sequence")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(B * S)]) \
        if B * S else torch.zeros(0, k, dtype=torch.int64)
    weights = torch.rand(B * S, k, generator=gen).round(decimals=1)
    sequence_T = torch.arange(B * S) // max(S, 1)
    scores = torch.rand(B * S, generator=gen).round(decimals=1)
    keep = capacity_keep_mask(ids, weights, E, cfg.expert_capacity, policy, None, sequence_T, B,
                              scores)
    assert keep.tolist() == keep_assignments(cfg, ids.tolist(), weights.tolist(), S,
                                             token_scores=scores.tolist())


def test_per_sequence_position_order_is_switch_transformers_cumsum():
    """Switch Transformers (transformers' SwitchTransformersTop1Router): a token keeps its
    expert while its rank among that expert's tokens of its sequence is <= capacity."""
    gen = torch.Generator().manual_seed(0)
    B, S, E, capacity = 3, 11, 4, 2
    ids_BS = torch.randint(0, E, (B, S), generator=gen)
    one_hot_BSE = torch.nn.functional.one_hot(ids_BS, E)
    switch_keep = ((torch.cumsum(one_hot_BSE, dim=-2) <= capacity) * one_hot_BSE).sum(-1) > 0
    keep = capacity_keep_mask(ids_BS.reshape(-1, 1), torch.ones(B * S, 1), E, capacity,
                              "position", None, torch.arange(B * S) // S, B)
    assert not switch_keep.all()
    assert keep.view(B, S).tolist() == switch_keep.tolist()
