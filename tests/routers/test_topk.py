"""route_topk and TopKRouter: selection and weights against direct formulas."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig
from moekit.routers import build_router
from moekit.routers.topk import route_topk


@pytest.mark.parametrize("E,k", [(1, 1), (8, 1), (8, 2), (8, 8), (64, 8)])
def test_softmax_topk_is_softmax_over_topk_logits(E, k):
    logits = torch.randn(33, E, dtype=torch.float64)
    r = route_topk(logits, k, "softmax", normalize_topk=True)
    sorted_ids = logits.argsort(-1, descending=True)[:, :k]
    assert torch.equal(r.expert_indices, sorted_ids)
    expected = torch.softmax(logits.gather(1, sorted_ids), -1)
    torch.testing.assert_close(r.expert_weights, expected)
    torch.testing.assert_close(r.router_probs, logits.softmax(-1))


def test_switch_keeps_raw_probability():
    logits = torch.randn(10, 4, dtype=torch.float64)
    r = route_topk(logits, 1, "softmax", normalize_topk=False)
    torch.testing.assert_close(r.expert_weights[:, 0], logits.softmax(-1).max(-1).values)


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_scores(normalize):
    logits = torch.randn(10, 6, dtype=torch.float64)
    r = route_topk(logits, 3, "sigmoid", normalize_topk=normalize, route_scale=2.5)
    scores = logits.sigmoid()
    top = scores.gather(1, r.expert_indices)
    assert torch.equal(r.expert_indices, logits.topk(3).indices)
    expected = top / top.sum(-1, keepdim=True) if normalize else top
    torch.testing.assert_close(r.expert_weights, 2.5 * expected)
    torch.testing.assert_close(r.router_probs.sum(-1), torch.ones(10, dtype=torch.float64))


def test_ids_distinct_and_in_range_for_nan_rows():
    logits = torch.randn(6, 8)
    logits[1] = float("nan")
    logits[3, 2] = float("nan")
    logits[4] = float("-inf")
    r = route_topk(logits, 3)
    assert r.expert_indices.min() >= 0 and r.expert_indices.max() < 8
    assert all(len(set(row)) == 3 for row in r.expert_indices.tolist())
    assert torch.isfinite(r.expert_weights[[0, 2, 5]]).all()


def test_unknown_score_func():
    with pytest.raises(ValueError, match=r"score_func must be one of \('softmax', 'sigmoid'\), got 'relu'"):
        route_topk(torch.zeros(2, 2), 1, "relu")


def test_near_ties_in_bf16_pick_the_float32_choice():
    """Logits that differ below bf16 resolution still rank as in float32."""
    router = build_router(MoEConfig(dim=2, expert_dim=4, num_experts=3, top_k=1))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 2.0**-10], [0.0, 0.0]]))
    router = router.to(torch.bfloat16)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    r = router(x)
    assert r.router_logits.dtype == torch.float32
    assert r.expert_indices.item() == 1  # 1 + 2^-10 > 1: lost if rounded to bf16


def test_gaussian_noise_std_is_softplus_of_noise_logits():
    cfg = MoEConfig(dim=4, expert_dim=4, num_experts=3, top_k=1, router_noise="gaussian")
    router = build_router(cfg)
    assert router.noise_weight.shape == (3, 4) and torch.count_nonzero(router.noise_weight) == 0
    x = torch.randn(20000, 4)
    clean = x @ router.weight.t()
    noise = router(x).router_logits - clean
    # noise std = softplus(0) = log 2 at the zero initialisation
    assert abs(noise.std().item() - 0.6931) < 0.02
    router.eval()
    torch.testing.assert_close(router(x).router_logits, clean)


def test_jitter_multiplies_router_input_within_eps():
    cfg = MoEConfig(dim=4, expert_dim=4, num_experts=3, top_k=1, router_noise="jitter",
                    jitter_eps=0.1)
    router = build_router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3, 4))
    x = torch.ones(1000, 4)
    logits = router(x).router_logits  # = jittered x[:, :3]
    assert logits.min() >= 0.9 - 1e-6 and logits.max() <= 1.1 + 1e-6 and logits.std() > 0.01


def test_router_bias_is_added_to_logits():
    router = build_router(MoEConfig(dim=4, expert_dim=4, num_experts=3, top_k=1, router_bias=True))
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(5, 4)
    torch.testing.assert_close(router(x).router_logits, x @ router.weight.t() + router.bias)
