"""Balanced assignment: exact floor/ceil balance, distinct experts, optimal score."""

from __future__ import annotations

import random

import pytest
import torch

from moekit.routers.balanced import balanced_assignment, greedy_balanced, improve_assignment
from tests.conftest import randomized_moe
from tests.reference import exact_optimum
from tests.test_layer import check_against_reference


def random_case(seed: int):
    rnd = random.Random(seed)
    T, E = rnd.randint(1, 30), rnd.randint(1, 8)
    k = rnd.randint(1, min(3, E))
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(T, E, generator=gen, dtype=torch.float64) * rnd.choice([0.5, 1, 3])).softmax(-1)
    return scores, k


@pytest.mark.parametrize("seed", range(40))
def test_balanced_distinct_and_exactly_optimal_after_cycle_cancelling(seed):
    scores, k = random_case(seed)
    T, E = scores.shape
    assigned = greedy_balanced(scores, k)
    loads = assigned.sum(0)
    assert (assigned.sum(1) == k).all()
    assert loads.min() >= T * k // E and loads.max() <= -(-T * k // E)
    steps = improve_assignment(scores, assigned, max_improvements=10**6)
    loads = assigned.sum(0)
    assert (assigned.sum(1) == k).all()
    assert loads.min() >= T * k // E and loads.max() <= -(-T * k // E)
    assert steps < 10**6
    assert abs((scores * assigned).sum().item() - exact_optimum(scores, k)) < 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_default_assignment_is_balanced_and_near_optimal(seed):
    scores, k = random_case(100 + seed)
    T, E = scores.shape
    ids = balanced_assignment(scores.float(), k)
    assert ids.shape == (T, k) and ids.dtype == torch.int64
    assert (ids.sort(1).values.diff(dim=1) > 0).all()
    loads = torch.bincount(ids.flatten(), minlength=E)
    assert loads.min() >= T * k // E and loads.max() <= -(-T * k // E)
    got = scores.gather(1, ids).sum().item()
    assert got >= (1 - 1e-2) * exact_optimum(scores, k)
    # experts of each token come best first
    chosen = scores.gather(1, ids)
    assert (chosen.diff(dim=1) <= 0).all()


def test_heavily_skewed_scores_still_balance():
    scores = torch.zeros(64, 8)
    scores[:, 0] = 1.0  # every token wants expert 0
    ids = balanced_assignment(scores, 2)
    assert torch.bincount(ids.flatten(), minlength=8).tolist() == [16] * 8
    assert (ids[:, 0] == 0).sum() + (ids[:, 1] == 0).sum() == 16


@pytest.mark.parametrize("num_tokens", [0, 1, 13])
@pytest.mark.parametrize("fields", [dict(top_k=1, score_func="sigmoid"), dict(top_k=2)])
def test_layer_matches_reference_in_training(num_tokens, fields):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, router="balanced", **fields)
    aux = check_against_reference(moe, num_tokens)
    if num_tokens:
        loads = aux.tokens_per_expert
        assert loads.max() - loads.min() <= 1


def test_eval_is_plain_topk():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, router="balanced")
    moe.eval()
    x = torch.randn(20, 8)
    _, aux = moe(x)
    assert aux.expert_indices.tolist() == (x @ moe.router.weight.t()).topk(2).indices.tolist()
