"""Dense mixture: every expert, weighted by the full softmax."""

from __future__ import annotations

import torch

from tests.conftest import randomized_moe
from tests.test_layer import check_against_reference


def test_dense_equals_full_softmax_mixture():
    moe = randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=4, router="dense")
    x = torch.randn(9, 8)
    y, aux = moe(x)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    outputs = []
    for e in range(4):
        gate, up = (x @ moe.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
        outputs.append((torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[e].t())
    expected = sum(probs[:, e:e + 1] * outputs[e] for e in range(4))
    torch.testing.assert_close(y, expected)
    assert aux.tokens_per_expert.tolist() == [9] * 4


def test_layer_matches_reference():
    check_against_reference(randomized_moe(dim=8, expert_dim=8, num_experts=4, top_k=4,
                                           router="dense"), 11)
