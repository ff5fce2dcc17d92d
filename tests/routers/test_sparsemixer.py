"""SparseMixer (PhiMoE's router): eval mode against a float64 reference and transformers'
``sparsemixer``; training mode's samples, weights and gradient estimator against
transformers' from one seed, and the sampling frequencies."""

from __future__ import annotations

import pytest
import torch

import moekit
from tests.conftest import assert_rel_close, assert_rel_close_per_expert, randomized_moe
from tests.reference import float64_params, reference_moe, sparsemixer_choice
from moekit.routers.sparsemixer import sparsemixer


def _logits(seed: int, tokens: int = 64, experts: int = 8) -> torch.Tensor:
    """Logits with near ties, so that the threshold keeps several candidates."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=gen) * 0.05 + 1.0).requires_grad_()


def _transformers_sparsemixer():
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    return phimoe.sparsemixer


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_eval_matches_the_float64_reference(top_k):
    cfg = moekit.MoEConfig(dim=4, expert_dim=4, num_experts=8, top_k=top_k, router="sparsemixer",
                           jitter_eps=0.02)
    logits = _logits(0)
    ids, weights = sparsemixer(logits, top_k, cfg.jitter_eps, training=False)
    upstream = torch.randn_like(weights)
    (weights * upstream).sum().backward()
    logits64 = logits.detach().double().requires_grad_()
    expected = [sparsemixer_choice(cfg, row) for row in logits64]
    assert ids.tolist() == [chosen for chosen, _ in expected]
    weights64 = torch.stack([w for _, w in expected])
    assert_rel_close(weights, weights64, 1e-6, "weights")
    (weights64 * upstream.double()).sum().backward()
    assert_rel_close(logits.grad, logits64.grad, 1e-5, "logits grad")
    assert (ids[:, :, None] != ids[:, None, :]).sum() == top_k * (top_k - 1) * len(ids)  # distinct
    candidates = (weights < 1).float().mean()
    assert candidates > 0.3  # the threshold keeps more than one expert for many tokens


def test_eval_equals_transformers_bitwise_with_gradients():
    theirs = _transformers_sparsemixer()
    logits = _logits(1)
    ids, weights = sparsemixer(logits, 2, 0.01, training=False)
    (grad_ours,) = torch.autograd.grad(weights.square().sum(), logits)
    their_weights, their_ids = theirs(logits, jitter_eps=0.01, training=False)
    (grad_theirs,) = torch.autograd.grad(their_weights.square().sum(), logits)
    assert torch.equal(ids, their_ids) and torch.equal(weights, their_weights)
    assert torch.equal(grad_ours, grad_theirs)


def test_training_equals_transformers_from_one_seed_samples_weights_and_estimator():
    theirs = _transformers_sparsemixer()
    logits = _logits(2, tokens=200)
    upstream = torch.randn(200, 2)
    torch.manual_seed(5)
    ids, weights = sparsemixer(logits, 2, 0.01, training=True)
    (grad_ours,) = torch.autograd.grad((weights * upstream).sum(), logits)
    torch.manual_seed(5)
    their_weights, their_ids = theirs(logits, jitter_eps=0.01, training=True)
    (grad_theirs,) = torch.autograd.grad((their_weights * upstream).sum(), logits)
    assert torch.equal(ids, their_ids) and torch.equal(weights, their_weights)
    assert torch.equal(grad_ours, grad_theirs)
    eval_ids, _ = sparsemixer(logits, 2, 0.01, training=False)
    assert (ids != eval_ids).any()  # the samples are not the argmax
    assert (ids[:, 0] != ids[:, 1]).all()


def test_training_samples_follow_the_candidates_softmax_and_the_midpoint_rate():
    """First choices: frequency of each expert = the mean of the candidates' softmax over
    repeated draws; a non-argmax pick keeps its full weight with probability 1/4."""
    logits = torch.tensor([[1.00, 0.99, 0.985, 0.5]]).expand(20000, 4).contiguous()
    ids, weights = sparsemixer(logits, 1, 0.01, training=True)
    candidates = logits[0, :3].softmax(0)  # 0.5 is outside the threshold: never sampled
    frequency = torch.bincount(ids[:, 0], minlength=4).float() / len(ids)
    assert frequency[3] == 0
    torch.testing.assert_close(frequency[:3], candidates, atol=0.015, rtol=0)  # std 0.0034
    gates = candidates[ids[:, 0].clamp(max=2)]
    not_argmax = ids[:, 0] != 0
    full = torch.isclose(weights[:, 0], gates, rtol=1e-6, atol=0)
    assert full[~not_argmax].all()
    assert abs(full[not_argmax].float().mean() - 0.25) < 0.02  # about 13,000 draws: std 0.004
    torch.testing.assert_close(weights[not_argmax & ~full, 0], 0.3333 * gates[not_argmax & ~full])


def test_the_layer_in_eval_matches_the_float64_reference_forward_and_backward():
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=6, router="sparsemixer",
                         jitter_eps=0.3, route_scale=1.5).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(21, 16, generator=gen, requires_grad=True)
    upstream = torch.randn(21, 16, generator=gen)
    y, aux = moe(x)
    (y * upstream).sum().backward()
    params = float64_params(moe)
    x64 = x.detach().double().requires_grad_()
    ref = reference_moe(moe.config, params, x64, training=False)
    assert aux.expert_indices.tolist() == ref["ids"]
    (ref["y"] * upstream.double()).sum().backward()
    assert_rel_close(y, ref["y"], 1e-5, "output")
    assert_rel_close(x.grad, x64.grad, 1e-5, "input grad")
    for name, parameter in moe.named_parameters():
        check = assert_rel_close_per_expert if name.startswith("experts.") else assert_rel_close
        check(parameter.grad, params[name].grad, 1e-5, f"grad of {name}")


def test_the_layer_trains_through_the_estimator():
    moe = randomized_moe(dim=16, expert_dim=8, num_experts=6, router="sparsemixer").train()
    y, aux = moe(torch.randn(40, 16))
    (y.square().sum() + aux.loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert aux.router_probs.shape == (40, 6)


def test_router_noise_is_refused_with_sparsemixer():
    with pytest.raises(ValueError, match=r"router='sparsemixer' reads jitter_eps as its threshold "
                                         r".*set router_noise='none', got 'jitter'"):
        moekit.MoEConfig(dim=4, expert_dim=4, num_experts=4, router="sparsemixer",
                         router_noise="jitter")
