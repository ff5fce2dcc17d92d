"""Run a test body on W gloo processes (spawned, file:// rendezvous) with a hard timeout."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _bootstrap(rank: int, body: Callable, world_size: int, init_file: str, result_dir: str,
               args: tuple, timeout_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        body(rank, world_size, result_dir, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(body: Callable, world_size: int, tmp_path, *args, timeout_s: float = 90) -> list:
    """Call ``body(rank, world_size, result_dir, *args)`` on every rank; each rank may
    torch.save a result to ``result_dir/rank{rank}.pt``. Returns those results in rank
    order (None for a rank that saved nothing). Fails the test instead of hanging."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _bootstrap, args=(body, world_size, str(tmp_path / "init"), str(tmp_path), args, timeout_s),
        nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {timeout_s} s")
    paths = [tmp_path / f"rank{r}.pt" for r in range(world_size)]
    return [torch.load(p, weights_only=True) if p.exists() else None for p in paths]
