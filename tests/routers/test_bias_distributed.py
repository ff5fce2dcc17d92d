"""The aux-loss-free bias is updated from global loads, identical on every rank (gloo, CPU)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moekit

WORLD_SIZE = 2
TIMEOUT_S = 60


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import datetime
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.manual_seed(0)  # same weights on every rank
        moe = moekit.MoE(moekit.MoEConfig(dim=8, expert_dim=8, num_experts=4, top_k=1,
                                          bias_update_rate=0.1, score_func="sigmoid"))
        torch.manual_seed(100 + rank)  # different data per rank, different sizes too
        x = torch.randn(5 + 7 * rank, 8) + rank
        _, aux = moe(x)
        torch.save({"bias": moe.router.expert_bias.clone(), "load": aux.tokens_per_expert},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_bias_identical_on_all_ranks_and_from_global_load(tmp_path):
    context = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    global_load = sum(r["load"] for r in results).float()
    expected = 0.1 * torch.sign(global_load.mean() - global_load)
    torch.testing.assert_close(results[0]["bias"], expected)
    # The data were chosen so that rank 0's own load would have given another update.
    local = results[0]["load"].float()
    assert not torch.equal(0.1 * torch.sign(local.mean() - local), expected)
