"""Auxiliary-loss-free balancing bias: selection only, sign update, training only."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.balancing import router_step
from moekit.routers.bias import update_expert_bias
from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference


def test_update_sign_and_magnitude():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), rate=0.1)  # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    update_expert_bias(bias, torch.tensor([5.0, 5.0, 5.0, 5.0]), rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))  # sign(0) = 0


def test_bias_changes_selection_but_not_weights():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=2, bias_update_rate=0.01,
                         score_func="sigmoid")
    x = torch.randn(30, 8)
    moe.eval()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, -5.0]))
    _, aux = moe(x)
    assert (aux.expert_indices[:, 0] == 0).all()  # the bias wins selection
    assert not (aux.expert_indices == 3).any()
    scores = (x @ moe.router.weight.t()).sigmoid()
    chosen = scores.gather(1, aux.expert_indices)
    torch.testing.assert_close(aux.expert_weights, chosen / chosen.sum(-1, keepdim=True))


def test_moves_only_in_the_step_from_training_loads_and_is_saved():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1, bias_update_rate=0.5)
    x = torch.randn(40, 8)
    assert "router.expert_bias" in moe.state_dict()
    assert "router.routed_load" not in moe.state_dict()  # empty at every step boundary
    moe.eval()
    moe(x)
    assert router_step(moe) == 1
    assert torch.count_nonzero(moe.router.expert_bias) == 0  # eval forwards record nothing
    moe.train()
    _, aux = moe(x)
    assert torch.count_nonzero(moe.router.expert_bias) == 0  # a forward never moves it
    assert torch.equal(moe.router.routed_load, aux.tokens_per_expert)
    router_step(moe)
    load = aux.tokens_per_expert.float()
    expected = 0.5 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.router.expert_bias, expected)
    assert not moe.router.expert_bias.requires_grad
    assert torch.count_nonzero(moe.router.routed_load) == 0


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_layer_matches_reference_with_a_bias(score_func):
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=8, top_k=2, bias_update_rate=0.1,
                         score_func=score_func)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(8) * 0.3)
    check_against_reference(moe, 21)


def test_bias_evens_out_a_skewed_router():
    torch.manual_seed(0)
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=1,
                                      bias_update_rate=0.01, score_func="sigmoid"))
    with torch.no_grad():
        moe.router.weight[0] += 1.0
    first = moe(torch.randn(256, 8).abs())[1].metrics()["load_max_over_mean"]
    router_step(moe)
    for _ in range(300):  # a training step each: forward, then the step's bias update
        moe(torch.randn(256, 8).abs())
        router_step(moe)
    moe.eval()
    _, aux = moe(torch.randn(4096, 8).abs())
    assert first == 4.0 and aux.metrics()["load_max_over_mean"] < 1.3


def test_fixed_expert_bias_steers_selection_and_never_moves():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=1, expert_bias=True)
    assert "router.expert_bias" in moe.state_dict()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    _, aux = moe(torch.randn(40, 8))  # training mode, gradients on
    assert torch.equal(aux.expert_indices, torch.full((40, 1), 2))
    assert torch.equal(moe.router.expert_bias, torch.tensor([0.0, 0.0, 100.0, 0.0]))
