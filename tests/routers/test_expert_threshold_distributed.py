"""Expert thresholds move from every rank's cutoffs, identical on every rank, in the same
router_step as an aux-loss-free bias (two record dtypes, two all_reduces; gloo, CPU)."""

from __future__ import annotations

import os

import torch
from torch import nn

import moekit
from moekit.routers.expert_threshold import capacity_cutoffs

from ..distributed import run_distributed

WORLD_SIZE = 2


def _worker(rank: int, world_size: int, result_dir: str) -> None:
    torch.manual_seed(0)  # same weights on every rank
    fields = dict(dim=8, expert_dim=8, num_experts=4, top_k=1)
    model = nn.Sequential(moekit.MoE(moekit.MoEConfig(**fields, bias_update_rate=0.1)),
                          moekit.MoE(moekit.MoEConfig(**fields, router="expert_threshold")))
    torch.manual_seed(100 + rank)  # different data per rank, different sizes too
    x = torch.randn(5 + 7 * rank, 8) + rank
    _, bias_aux = model[0](x)
    _, threshold_aux = model[1](x)
    cutoffs = capacity_cutoffs(threshold_aux.router_probs, model[1].router.capacity(x.shape[0]))
    assert moekit.router_step(model) == 2
    torch.save({"bias": model[0].router.expert_bias.clone(), "load": bias_aux.tokens_per_expert,
                "thresholds": model[1].router.thresholds.clone(), "cutoffs": cutoffs,
                "tokens": x.shape[0]}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_thresholds_identical_on_all_ranks_and_from_every_rank_cutoffs(tmp_path):
    results = run_distributed(_worker, WORLD_SIZE, tmp_path)
    assert torch.equal(results[0]["thresholds"], results[1]["thresholds"])
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    weighted = sum(r["cutoffs"].double() * r["tokens"] for r in results)
    expected = weighted / sum(r["tokens"] for r in results)
    torch.testing.assert_close(results[0]["thresholds"].double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(results[0]["cutoffs"].double(), expected)  # rank 0 alone differs
    global_load = sum(r["load"] for r in results).float()
    torch.testing.assert_close(results[0]["bias"], 0.1 * torch.sign(global_load.mean() - global_load))
