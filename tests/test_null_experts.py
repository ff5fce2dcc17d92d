"""Null (zero-computation) experts: the layer against the float64 reference, forward and
backward; no expert rows for null assignments; counts and metrics of real and null apart."""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.losses import load_balance_loss
from moekit.null_experts import null_counts, real_balance_view, real_expert_routing
from moekit.routing import Routing
from tests import test_layer
from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference

CASES = {
    "zero": dict(num_experts=4, top_k=2, num_null_experts=2),
    "copy": dict(num_experts=4, top_k=2, num_null_experts=3, null_expert_kind="copy"),
    "one-expert-k1": dict(num_experts=1, top_k=1, num_null_experts=1, null_expert_kind="copy"),
    "real-balance": dict(num_experts=6, top_k=2, num_null_experts=2, balance_null_experts=False,
                         z_loss_weight=0.1, balance_loss_weight=0.5),
    "sigmoid-raw": dict(num_experts=6, top_k=3, num_null_experts=2, score_func="sigmoid",
                        normalize_topk=False, route_scale=2.0),
    "capacity-score": dict(num_experts=4, top_k=2, num_null_experts=2, capacity_factor=0.5,
                           drop_policy="score"),
    "capacity-position-copy": dict(num_experts=4, top_k=3, num_null_experts=4,
                                   capacity_factor=0.75, null_expert_kind="copy"),
    "shared-bias": dict(num_experts=4, top_k=2, num_null_experts=2, num_shared_experts=1,
                        bias_update_rate=0.1, router_bias=True),
    "sequence-balance": dict(num_experts=4, top_k=2, num_null_experts=2, balance_scope="sequence",
                             balance_null_experts=False),
    "loop-backend": dict(num_experts=4, top_k=2, num_null_experts=2, experts_backend="loop"),
    "global-balance-real": dict(num_experts=4, top_k=3, num_null_experts=3, balance_scope="global",
                                balance_null_experts=False),
}


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 33])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case, num_tokens):
    moe = randomized_moe(dim=7, expert_dim=5, **CASES[case])
    batch = 1 if moe.config.balance_scope == "sequence" else None
    # one expert, k=1: the combine weight is always 1, so the router's gradient is only the
    # losses' (norm about 3e-4), summed from cancelling float32 terms (measured 1.9e-3
    # relative); the float64 test below holds it to 1e-10
    router_tol = 5e-3 if case == "one-expert-k1" else test_layer.ROUTER_GRAD_TOL
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_layer, "ROUTER_GRAD_TOL", router_tol)
        aux = check_against_reference(moe, num_tokens, batch=batch)
    assert aux.router_logits.shape == (num_tokens, moe.config.num_router_slots)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float64_to_1e10_router_included(case, monkeypatch):
    moe = randomized_moe(dim=7, expert_dim=5, dtype=torch.float64, **CASES[case])
    monkeypatch.setattr(test_layer, "ROUTER_GRAD_TOL", 1e-10)
    check_against_reference(moe, 33, dtype=torch.float64, tol=1e-10, grad_tol=1e-10,
                            batch=1 if moe.config.balance_scope == "sequence" else None)


def _null_heavy_moe(**fields) -> moekit.MoE:
    """A layer whose router favours the null slots, so that many tokens pick them."""
    moe = randomized_moe(dim=8, expert_dim=6, num_experts=4, top_k=2, num_null_experts=2,
                         router_bias=True, **fields)
    with torch.no_grad():
        moe.router.bias[4:] += 1.5
    return moe


def test_null_assignments_make_no_expert_rows_and_counts_split_real_and_null():
    moe = _null_heavy_moe()
    calls = []
    original = moe.experts.forward
    moe.experts.forward = lambda x_TD, plan: calls.append(int(plan.counts_E.sum())) \
        or original(x_TD, plan)
    x = torch.randn(40, 8)
    _, aux = moe(x)
    ids = aux.expert_indices
    real, null = int((ids < 4).sum()), int((ids >= 4).sum())
    assert 0 < null < ids.numel()
    assert calls == [real]  # the experts computed exactly the real assignments' rows
    assert aux.tokens_per_expert.shape == (4,) and int(aux.tokens_per_expert.sum()) == real
    assert aux.null_tokens_per_expert.tolist() == [int((ids == 4).sum()), int((ids == 5).sum())]
    metrics = aux.metrics()
    assert metrics["null_fraction"] == pytest.approx(null / ids.numel())
    assert metrics["real_experts_per_token"] == pytest.approx(real / 40)
    assert metrics["dropped_fraction"] == 0.0


def test_a_token_with_only_null_experts_gets_zero_or_its_weighted_input():
    """Replayed to null slots only: no expert runs; "zero" gives 0 and every expert weight
    a zero (not None) gradient; "copy" gives (w_1 + w_2) * x."""
    x = torch.randn(3, 8, requires_grad=True)
    ids = torch.tensor([[4, 5]] * 3)
    zero = _null_heavy_moe()
    y, aux = zero(x, expert_indices=ids)
    assert torch.equal(y, torch.zeros_like(y)) and aux.tokens_per_expert.sum() == 0
    (y.sum() + aux.loss).backward()
    for name, param in zero.experts.named_parameters():
        assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param)), name
    assert zero.router.weight.grad.abs().sum() > 0  # the balance loss still reaches the router
    copy = _null_heavy_moe(null_expert_kind="copy")
    y, aux = copy(x, expert_indices=ids)
    torch.testing.assert_close(y, x * aux.expert_weights.sum(1, keepdim=True))


def test_capacity_counts_real_experts_only_and_never_drops_a_null_assignment():
    """Capacity 1 per real expert: null assignments take none of it and are never dropped;
    dropped_fraction is over the real assignments."""
    moe = randomized_moe(dim=8, expert_dim=6, num_experts=4, top_k=2, num_null_experts=2,
                         expert_capacity=1)
    ids = torch.tensor([[0, 4], [0, 5], [4, 5], [1, 4]])
    _, aux = moe(torch.randn(4, 8), expert_indices=ids)
    assert aux.tokens_per_expert.tolist() == [1, 1, 0, 0]
    assert aux.null_tokens_per_expert.tolist() == [3, 2]
    assert float(aux.dropped_fraction) == pytest.approx(1 / 3)


def test_balance_loss_covers_all_slots_by_default_and_real_experts_on_request():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 5, generator=gen).softmax(1)
    ids = torch.tensor([[0, 3], [3, 4], [1, 4], [2, 0], [4, 3], [1, 2]])  # E = 3 real, N = 2
    everything = load_balance_loss(probs, ids)
    real_probs, real_ids, real_mask = real_balance_view(probs, ids, None, 3)
    real_only = load_balance_loss(real_probs, real_ids, real_mask)
    counts = torch.tensor([2.0, 2.0, 2.0])  # real assignments per real expert
    expected = 3 * torch.dot(counts / counts.sum(), probs[:, :3].mean(0))
    torch.testing.assert_close(real_only, expected)
    assert not torch.isclose(everything, real_only)
    for balance_null_experts, loss in ((True, everything), (False, real_only)):
        moe = randomized_moe(dim=4, expert_dim=3, num_experts=3, top_k=2, num_null_experts=2,
                             balance_null_experts=balance_null_experts)
        routing = Routing(ids, probs.gather(1, ids), probs, probs.log())
        from moekit.aux import moe_aux
        plan = moe.dispatcher.plan(real_expert_routing(routing, 3))
        aux = moe_aux(routing, plan, moe.config, True)
        torch.testing.assert_close(aux.balance_loss, loss)


def test_helpers_on_a_routing_with_an_assignment_mask():
    ids = torch.tensor([[0, 3, 4], [4, 1, 3]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert null_counts(ids, 3, 2, mask).tolist() == [2, 1]
    assert null_counts(ids, 3, 2).tolist() == [2, 2]
    routing = Routing(ids, torch.ones(2, 3), torch.ones(2, 5) / 5, torch.zeros(2, 5), mask)
    real = real_expert_routing(routing, 3)
    assert real.expert_indices.tolist() == [[0, 0, 0], [0, 1, 0]]
    assert real.assignment_mask.tolist() == [[True, False, False], [False, False, False]]


def test_metrics_without_tokens_are_nan_and_without_nulls_absent():
    moe = randomized_moe(dim=8, expert_dim=6, num_experts=4, top_k=2, num_null_experts=2)
    metrics = moe(torch.randn(0, 8))[1].metrics()
    assert math.isnan(metrics["null_fraction"]) and math.isnan(metrics["real_experts_per_token"])
    plain = randomized_moe(dim=8, expert_dim=6, num_experts=4, top_k=2)
    assert "null_fraction" not in plain(torch.randn(3, 8))[1].metrics()


@pytest.mark.parametrize("fields,match", [
    (dict(num_null_experts=-1), "num_null_experts"),
    (dict(num_null_experts=1.5), "num_null_experts"),
    (dict(num_null_experts=2, null_expert_kind="constant"), "null_expert_kind"),
    (dict(num_null_experts=2, balance_null_experts=1), "balance_null_experts"),
    (dict(num_null_experts=2, router="hash"), "router='topk'.*router='hash'"),
    (dict(num_null_experts=2, router="expert_choice"), "router='topk'"),
    (dict(num_null_experts=2, num_groups=2), "without groups.*num_groups=2"),
])
def test_bad_null_expert_settings_are_refused(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        moekit.MoEConfig(dim=8, expert_dim=6, num_experts=4, top_k=2, **fields)


def test_null_slots_are_router_parameters_and_counted():
    from moekit.params.counting import moe_layer_parameters
    cfg = moekit.MoEConfig(dim=8, expert_dim=6, num_experts=4, top_k=2, num_null_experts=3,
                           router_bias=True)
    moe = moekit.MoE(cfg)
    assert moe.router.weight.shape == (7, 8) and moe.router.bias.shape == (7,)
    assert moe_layer_parameters(cfg)["routers"].total == sum(p.numel() for p in moe.router.parameters())


@pytest.mark.parametrize("replay", [False, True], ids=["routed", "replayed"])
def test_bf16_copy_experts_match_the_reference_and_keep_the_dtype(replay):
    moe = randomized_moe(dtype=torch.bfloat16, dim=32, expert_dim=16, num_experts=4, top_k=2,
                         num_null_experts=2, null_expert_kind="copy")
    ids = torch.rand(33, 6).argsort(1)[:, :2] if replay else None
    check_against_reference(moe, 33, dtype=torch.bfloat16, tol=2e-2, grad_tol=5e-2,
                            expert_indices=ids)
