"""Experts: parameter layout, backend choice, and input checks."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig
from moekit.contract import rows_plan
from moekit.experts import Experts


def test_parameter_layout_follows_transformers():
    gated = Experts(MoEConfig(dim=8, expert_dim=6, num_experts=3, top_k=1, bias=True))
    assert gated.gate_up_proj.shape == (3, 12, 8) and gated.down_proj.shape == (3, 8, 6)
    assert gated.gate_up_proj_bias.shape == (3, 12) and gated.down_proj_bias.shape == (3, 8)
    plain = Experts(MoEConfig(dim=8, expert_dim=6, num_experts=3, top_k=1, activation="gelu"))
    assert plain.up_proj.shape == (3, 6, 8) and plain.down_proj_bias is None
    assert sorted(n for n, _ in plain.named_parameters()) == ["down_proj", "up_proj"]


def test_auto_backend_choice():
    aligned = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1))
    assert aligned.backend_for(torch.float32) == "fused"  # CPU
    assert aligned.backend_for(torch.float64) == "fused"
    on_meta = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1)).to("meta")
    assert on_meta.backend_for(torch.float32) == "loop"  # no grouped_mm off CPU/CUDA
    forced = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=2, top_k=1,
                               experts_backend="fused")).to("meta")
    with pytest.raises(ValueError, match="experts_backend='fused' runs on CPU only, not meta"):
        forced.backend_for(torch.float32)
    forced = Experts(MoEConfig(dim=7, expert_dim=8, num_experts=2, top_k=1,
                               experts_backend="grouped_mm"))
    with pytest.raises(ValueError, match=r"cannot run dtype torch.float32 on cpu with sizes \(7, 16, 8\)"):
        forced.backend_for(torch.float32)


@pytest.mark.parametrize("backend", ["fused", "grouped_mm"])  # each against the loop
def test_backends_agree(backend):
    torch.manual_seed(0)
    experts = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=3, top_k=1, bias=True,
                                experts_backend=backend))
    loop = Experts(MoEConfig(dim=16, expert_dim=8, num_experts=3, top_k=1, bias=True,
                             experts_backend="loop"))
    loop.load_state_dict(experts.state_dict())
    rows, counts = torch.randn(9, 16, requires_grad=True), torch.tensor([4, 0, 5])
    grads = []
    for module in (experts, loop):
        out = module(rows, rows_plan(counts, rows.shape[0]))
        grads.append(torch.autograd.grad(out.square().sum(), [rows, *module.parameters()]))
    torch.testing.assert_close(experts(rows, rows_plan(counts, rows.shape[0])), loop(rows, rows_plan(counts, rows.shape[0])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_counts_are_rejected():
    experts = Experts(MoEConfig(dim=8, expert_dim=8, num_experts=3, top_k=1))
    with pytest.raises(ValueError, match=r"summing to the 5 rows; got \[1, 1, 1\]"):
        experts(torch.randn(5, 8), rows_plan(torch.tensor([1, 1, 1]), 5))
    with pytest.raises(ValueError, match=r"3 non-negative counts .* got \[6, -1, 0\]"):
        experts(torch.randn(5, 8), rows_plan(torch.tensor([6, -1, 0]), 5))
    with pytest.raises(ValueError, match=r"got \[5\]"):
        experts(torch.randn(5, 8), rows_plan(torch.tensor([5]), 5))
