"""The capacity dispatcher's options against the float64 layer reference, forward and
backward: renormalize_kept (the kept weights rescaled to the sum of all k),
eval_capacity_fraction (another capacity, ceil(fraction * T), in eval mode) and
drop_policy="token_score" (by each token's top router probability)."""

from __future__ import annotations

import pytest
import torch

import moekit
from tests.conftest import assert_rel_close, assert_rel_close_per_expert, randomized_moe
from tests.reference import float64_params, reference_moe
from tests.test_layer import check_against_reference


def _check_eval(moe: moekit.MoE, num_tokens: int, seed: int = 0) -> moekit.MoEAux:
    """Forward and every gradient in eval mode against the reference (training=False)."""
    moe.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, moe.config.dim, generator=gen, requires_grad=True)
    upstream = torch.randn(num_tokens, moe.config.dim, generator=gen)
    y, aux = moe(x)
    (y * upstream).sum().backward()
    params = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    ref = reference_moe(moe.config, params, x64, training=False)
    (ref["y"] * upstream.double()).sum().backward()
    assert aux.expert_indices.tolist() == ref["ids"]
    assert aux.tokens_per_expert.tolist() == ref["counts"]
    assert_rel_close(y, ref["y"], 1e-5, "output")
    assert_rel_close(x.grad, x64.grad, 1e-5, "input grad")
    for name, parameter in moe.named_parameters():
        check = assert_rel_close_per_expert if name.startswith("experts.") else assert_rel_close
        check(parameter.grad, params[name].grad, 1e-5, f"grad of {name}")
    return aux


@pytest.mark.parametrize("fields", [
    dict(expert_capacity=3),
    dict(capacity_factor=0.5, drop_policy="score", route_scale=2.0),
    dict(capacity_factor=0.75, normalize_topk=False, top_k=3),
    dict(expert_capacity=4, drop_policy="token_score"),
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_renormalize_kept_matches_the_reference(fields):
    fields = dict(dim=16, expert_dim=8, num_experts=4, top_k=2) | fields
    moe = randomized_moe(renormalize_kept=True, **fields)
    aux = check_against_reference(moe, 33)
    assert aux.tokens_per_expert.sum() < 33 * moe.config.top_k  # dropped: the rescaling matters
    plain = randomized_moe(**fields)
    x = torch.randn(33, 16)
    assert not torch.allclose(moe(x)[0], plain(x)[0])


@pytest.mark.parametrize("policy", ["token_score", "score", "position"])
def test_drop_policies_match_the_reference_in_training_and_eval(policy):
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=4, top_k=2, capacity_factor=0.5,
                         drop_policy=policy, score_func="sigmoid")
    check_against_reference(moe, 29)
    moe.zero_grad()
    _check_eval(moe, 29)


def test_renormalize_kept_gives_a_token_that_lost_one_choice_its_whole_weight():
    moe = randomized_moe(dim=4, expert_dim=8, num_experts=4, expert_capacity=1,
                         renormalize_kept=True)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    logits = torch.tensor([[2.0, 1.0, -5.0, -5.0],    # experts 0, 1: both kept
                           [-5.0, 1.0, 2.0, -5.0],    # experts 2, 1: 1 is full
                           [2.0, -5.0, -5.0, 1.0]])   # experts 0, 3: 0 is full
    plan = moe.dispatcher.plan(moe.router(logits))
    assert plan.kept_TK.tolist() == [[True, True], [True, False], [False, True]]
    first = 1 / (1 + torch.exp(torch.tensor(-1.0)))
    torch.testing.assert_close(plan.weights_TK, torch.tensor([[first, 1 - first], [1.0, 0.0],
                                                              [0.0, 1.0]]))
    moe = randomized_moe(dim=4, expert_dim=8, num_experts=4, expert_capacity=1,
                         renormalize_kept=True)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    plan = moe.dispatcher.plan(moe.router(torch.cat([logits[:1]] * 2)))
    assert torch.equal(plan.weights_TK[1], torch.zeros(2))  # lost both: zeros, not NaN


@pytest.mark.parametrize("fraction", [0.25, 0.5, 2.0])
def test_eval_capacity_fraction_matches_the_reference_in_eval_and_not_in_training(fraction):
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=4, expert_capacity=2,
                         eval_capacity_fraction=fraction, renormalize_kept=True)
    aux = _check_eval(moe, 21)
    capacity = -(-int(fraction * 4) * 21 // 4)  # ceil(fraction * 21)
    assert aux.tokens_per_expert.max() <= min(capacity, 21)
    if fraction >= 1:
        assert aux.tokens_per_expert.sum() == 42  # never drops
    moe.zero_grad()
    aux = check_against_reference(moe, 21)  # training: the fixed capacity 2
    assert aux.tokens_per_expert.max() <= 2


@pytest.mark.parametrize("fields, message", [
    (dict(renormalize_kept=True), r"renormalize_kept needs a token-choice router with capacity"),
    (dict(eval_capacity_fraction=1.0), r"eval_capacity_fraction needs a token-choice router"),
    (dict(eval_capacity_fraction=0.0, capacity_factor=1.0),
     r"eval_capacity_fraction must be a finite number > 0.0"),
    (dict(renormalize_kept=True, router="expert_choice", capacity_factor=1.0),
     r"renormalize_kept needs a token-choice router .* router='expert_choice'"),
])
def test_bad_options_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, **fields)
