"""Routing replay: moe(x, expert_indices=ids) routes to exactly ids, weighted by the live router.

Replaying a forward's own routing is bitwise that forward (output, losses, every gradient);
replaying another routing equals the float64 reference routed by hand to those experts.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.replay import check_expert_indices
from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference

BASE = dict(dim=8, expert_dim=6)
# token-choice configurations: every weighting rule, selection-only bias, groups, noise, capacity
REPLAYABLE = {
    "softmax": dict(num_experts=8, top_k=2),
    "switch": dict(num_experts=8, top_k=1, normalize_topk=False, route_scale=2.5),
    "sigmoid": dict(num_experts=8, top_k=3, score_func="sigmoid"),
    "sigmoid-raw-bias": dict(num_experts=8, top_k=2, score_func="sigmoid", normalize_topk=False,
                             bias_update_rate=0.1, router_bias=True),
    "groups": dict(num_experts=8, top_k=2, num_groups=4, topk_groups=2, score_func="sigmoid"),
    "noise": dict(num_experts=8, top_k=2, router_noise="gaussian"),
    "jitter": dict(num_experts=8, top_k=2, router_noise="jitter", jitter_eps=0.1),
    "capacity-position": dict(num_experts=4, top_k=2, capacity_factor=0.5),
    "capacity-score": dict(num_experts=4, top_k=2, capacity_factor=0.75, drop_policy="score"),
    "shared-z-loss": dict(num_experts=6, top_k=2, num_shared_experts=1, z_loss_weight=0.1),
    "sequence-balance": dict(num_experts=6, top_k=2, balance_scope="sequence"),
    "global-balance": dict(num_experts=6, top_k=2, balance_scope="global"),
    "null-copy": dict(num_experts=4, top_k=2, num_null_experts=2, null_expert_kind="copy"),
    "p-norm-output-bias": dict(num_experts=6, top_k=2, normalize_topk_p=2.0, output_bias=True),
    "batch-invariant-sigmoid": dict(num_experts=6, top_k=2, score_func="sigmoid",
                                    batch_invariant=True),
}


def _step(moe: moekit.MoE, x: torch.Tensor, upstream: torch.Tensor, seed: int, **kwargs):
    """(y, aux, x.grad, {name: grad}) of one training forward and backward, noise seeded."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y, aux = moe(x, **kwargs)
    ((y * upstream).sum() + aux.loss).backward()
    return y, aux, x.grad, {name: p.grad.clone() for name, p in moe.named_parameters()}


@pytest.mark.parametrize("case", REPLAYABLE)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_replaying_its_own_routing_is_bitwise_the_same_forward_and_backward(case, padded):
    moe = randomized_moe(**BASE, **REPLAYABLE[case])
    x, upstream = torch.randn(3, 11, 8), torch.randn(3, 11, 8)
    mask = torch.rand(3, 11) > 0.3 if padded else None
    y, aux, x_grad, grads = _step(moe, x, upstream, 5, padding_mask=mask)
    if moe.step_load is not None:
        moe.step_load.zero_()  # both forwards start the optimizer step afresh
    y2, aux2, x_grad2, grads2 = _step(moe, x, upstream, 5, padding_mask=mask,
                                      expert_indices=aux.expert_indices)
    assert torch.equal(aux2.expert_indices, aux.expert_indices)
    for name in ("expert_weights", "router_probs", "loss", "balance_loss", "z_loss",
                 "tokens_per_expert", "dropped_fraction"):
        assert torch.equal(getattr(aux2, name), getattr(aux, name)), name
    assert torch.equal(y2, y) and torch.equal(x_grad2, x_grad)
    for name, grad in grads.items():
        assert torch.equal(grads2[name], grad), name


def _other_routing(num_tokens: int, num_slots: int, top_k: int, seed: int) -> torch.Tensor:
    """[T, K] distinct random slots per token."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_slots, generator=gen).argsort(1)[:, :top_k]


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 33])
@pytest.mark.parametrize("case", [c for c in REPLAYABLE if "noise" not in c and "jitter" not in c
                                  and c != "global-balance"])
def test_replaying_another_routing_matches_the_float64_reference(case, num_tokens):
    moe = randomized_moe(**BASE, **REPLAYABLE[case])
    cfg = moe.config
    ids = _other_routing(num_tokens, cfg.num_router_slots, cfg.top_k, seed=num_tokens)
    aux = check_against_reference(moe, num_tokens, expert_indices=ids,
                                  batch=1 if cfg.balance_scope == "sequence" else None)
    assert torch.equal(aux.expert_indices, ids)


def test_replay_differs_from_routing_where_the_ids_differ():
    """The replayed ids are obeyed, not the router's own choice (a replay that ignored them
    would pass the bitwise test above)."""
    moe = randomized_moe(**BASE, num_experts=8, top_k=2)
    x = torch.randn(20, 8)
    _, aux = moe(x)
    other = _other_routing(20, 8, 2, seed=1)
    assert not torch.equal(other, aux.expert_indices)
    _, replayed = moe(x, expert_indices=other)
    assert torch.equal(replayed.expert_indices, other)
    expected = torch.bincount(other.reshape(-1), minlength=8)
    assert torch.equal(replayed.tokens_per_expert, expected)


def test_replay_under_a_padding_mask_equals_replay_on_the_real_tokens():
    moe = randomized_moe(**BASE, num_experts=6, top_k=2)
    x, mask = torch.randn(2, 7, 8), torch.rand(2, 7) > 0.4
    ids = _other_routing(int(mask.sum()), 6, 2, seed=3)
    y, aux = moe(x, padding_mask=mask, expert_indices=ids)
    y_real, aux_real = moe(x[mask], expert_indices=ids)
    torch.testing.assert_close(y[mask], y_real, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert torch.equal(aux.tokens_per_expert, aux_real.tokens_per_expert)


def test_replay_is_dropped_by_capacity_like_a_routed_assignment():
    """Capacity 2 per expert: of five tokens replayed to experts (0, 1), the first two keep
    both, the rest are dropped, first choices before second choices (position policy)."""
    moe = randomized_moe(**BASE, num_experts=4, top_k=2, expert_capacity=2)
    ids = torch.tensor([[0, 1]] * 5)
    _, aux = moe(torch.randn(5, 8), expert_indices=ids)
    assert aux.tokens_per_expert.tolist() == [2, 2, 0, 0]
    assert float(aux.dropped_fraction) == pytest.approx(6 / 10)


@pytest.mark.parametrize("router,fields", [
    ("expert_choice", dict(num_experts=4, top_k=2)),
    ("hash", dict(num_experts=4, top_k=2)),
    ("balanced", dict(num_experts=4, top_k=2)),
    ("dense", dict(num_experts=4, top_k=4)),
])
def test_routers_without_a_token_choice_refuse_replay(router, fields):
    moe = moekit.MoE(moekit.MoEConfig(**BASE, router=router, **fields))
    ids = _other_routing(3, 4, fields["top_k"], seed=0)
    with pytest.raises(ValueError, match=f"router='{router}'"):
        moe(torch.randn(3, 8), expert_indices=ids)


@pytest.mark.parametrize("ids,error,match", [
    ([[0, 1]], TypeError, "torch.Tensor"),
    (torch.tensor([[0, 1]], dtype=torch.int32), TypeError, "int64"),
    (torch.tensor([0, 1]), ValueError, r"\[T, K\] = \[1, 2\]"),
    (torch.tensor([[0, 1, 2]]), ValueError, r"got \(1, 3\)"),
    (torch.tensor([[0, 4]]), ValueError, r"\[0, 4\).*got 4"),
    (torch.tensor([[-1, 0]]), ValueError, r"\[0, 4\).*got -1"),
    (torch.tensor([[2, 2]]), ValueError, r"distinct.*token 0 has \[2, 2\]"),
])
def test_bad_expert_indices_are_refused_naming_the_problem(ids, error, match):
    moe = moekit.MoE(moekit.MoEConfig(**BASE, num_experts=4, top_k=2))
    with pytest.raises(error, match=match):
        moe(torch.randn(1, 8), expert_indices=ids)


def test_check_expert_indices_accepts_null_slots_and_zero_tokens():
    ids = torch.tensor([[5, 0], [4, 3]])
    assert check_expert_indices(ids, 2, 2, 6, ids.device) is ids
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        check_expert_indices(ids, 2, 2, 5, ids.device)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    assert check_expert_indices(empty, 0, 2, 4, empty.device) is empty
