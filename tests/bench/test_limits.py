"""The weight-streaming bound reads exactly the weights a forward touches."""

from __future__ import annotations

import torch

import moekit
from moekit.bench.limits import touched_weights


def test_touched_weights_are_the_router_and_the_routed_experts():
    torch.manual_seed(0)
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=4, num_experts=6, top_k=1))
    with torch.no_grad():  # route every token to expert 1 or 4 (logits from the first two dims)
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = moe.router.weight[4, 1] = 1.0
    x = torch.zeros(5, 8)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    weights = touched_weights(moe, x)
    experts = moe.experts
    expected = [moe.router.weight, experts.gate_up_proj[1:2], experts.down_proj[1:2],
                experts.gate_up_proj[4:5], experts.down_proj[4:5]]
    assert len(weights) == len(expected)
    for got, want in zip(weights, expected):
        assert got.data_ptr() == want.data_ptr() and got.shape == want.shape
