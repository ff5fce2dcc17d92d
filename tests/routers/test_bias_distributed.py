"""The aux-loss-free bias is updated from global loads, identical on every rank (gloo, CPU)."""

from __future__ import annotations

import os

import torch

import moekit

from ..distributed import run_distributed

WORLD_SIZE = 2


def _worker(rank: int, world_size: int, result_dir: str) -> None:
    torch.manual_seed(0)  # same weights on every rank
    moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=1,
                                      bias_update_rate=0.1, score_func="sigmoid"))
    torch.manual_seed(100 + rank)  # different data per rank, different sizes too
    x = torch.randn(5 + 7 * rank, 8) + rank
    _, aux = moe(x)
    moekit.router_step(moe)  # once per optimizer step, over every rank
    torch.save({"bias": moe.router.expert_bias.clone(), "load": aux.tokens_per_expert},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_bias_identical_on_all_ranks_and_from_global_load(tmp_path):
    results = run_distributed(_worker, WORLD_SIZE, tmp_path)
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    global_load = sum(r["load"] for r in results).float()
    expected = 0.1 * torch.sign(global_load.mean() - global_load)
    torch.testing.assert_close(results[0]["bias"], expected)
    # The data were chosen so that rank 0's own load would have given another update.
    local = results[0]["load"].float()
    assert not torch.equal(0.1 * torch.sign(local.mean() - local), expected)
