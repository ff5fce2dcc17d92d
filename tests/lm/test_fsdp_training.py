"""Data + expert parallel training with FSDP2 (--fsdp): the same run as one process, and
checkpoints that resume in one process without FSDP."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.errors import UsageError
from moekit.lm.distributed import DataExpertParallel, FullyShardedExpertParallel
from moekit.lm.divergence import weights_problem
from moekit.lm.model import MoETransformer
from moekit.lm.train import train
from moekit.placement import Placement

from ..distributed import run_distributed
from .helpers import synthetic_corpus, write_text_files
from .test_distributed import QUIET, REPO, _assert_same_run, _configs


def _fsdp_train_worker(rank, world_size, result_dir, run_dir, expert_parallel_size, stop_after, resume,
                       placement=None):
    model_cfg, train_cfg = _configs()
    train(model_cfg, train_cfg, synthetic_corpus(), run_dir, stop_after=stop_after, resume=resume,
          parallel=FullyShardedExpertParallel(expert_parallel_size, placement), **QUIET)


@pytest.mark.parametrize("world_size,expert_parallel_size", [pytest.param(2, 1, id="dp2-ep1"),
                                                             pytest.param(2, 2, id="dp1-ep2"),
                                                             pytest.param(4, 2, id="dp2-ep2")])
def test_fsdp_training_equals_one_process(tmp_path, world_size, expert_parallel_size):
    model_cfg, train_cfg = _configs()
    assert train(model_cfg, train_cfg, synthetic_corpus(), tmp_path / "one", **QUIET).finished
    run_distributed(_fsdp_train_worker, world_size, tmp_path / "work", str(tmp_path / "sharded"),
                    expert_parallel_size, None, False, timeout_s=300)
    # the run folder holds one-process weights: every expert, in one file
    experts = load_file(str(tmp_path / "sharded" / "model.safetensors"))["blocks.0.ffn.experts.down_proj"]
    assert experts.shape[0] == model_cfg.moe.num_experts
    _assert_same_run(tmp_path / "sharded", tmp_path / "one")


def test_runs_move_between_one_process_and_fsdp(tmp_path):
    """One process to step 2, FSDP at dp1/ep2 (experts placed out of order) to step 4, one
    process to the end: the same losses and weights as a run that never stopped."""
    model_cfg, train_cfg = _configs()
    assert train(model_cfg, train_cfg, synthetic_corpus(), tmp_path / "straight", **QUIET).finished
    run_dir = tmp_path / "moved"
    train(model_cfg, train_cfg, synthetic_corpus(), run_dir, stop_after=2, **QUIET)
    placement = {"blocks.0.ffn": [[3, 0], [2, 1]], "blocks.1.ffn": [[1, 2], [0, 3]]}
    run_distributed(_fsdp_train_worker, 2, tmp_path / "work", str(run_dir), 2, 4, True, placement,
                    timeout_s=240)
    assert train(model_cfg, train_cfg, synthetic_corpus(), run_dir, resume=True, **QUIET).finished
    _assert_same_run(run_dir, tmp_path / "straight")


def test_torchrun_fsdp_cli_equals_one_process(tmp_path):
    flags = ["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
             "--num-experts", "4", "--data", str(write_text_files(tmp_path / "data")), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "moekit", "train", "--expert-parallel", "--fsdp", "--expert-parallel-size", "1",
         "--out", str(tmp_path / "two"), *flags],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("step 4: validation loss") == 1  # only rank 0 logs
    assert main(["train", "--out", str(tmp_path / "one"), *flags]) == 0
    _assert_same_run(tmp_path / "two", tmp_path / "one")


@pytest.mark.parametrize("flags,message", [
    (["--fsdp"], "--fsdp shards the model over processes: it needs --expert-parallel"),
    (["--expert-parallel", "--expert-parallel-size", "2"],
     "--expert-parallel-size 2 needs --fsdp: without it the experts are sharded over every process")])
def test_fsdp_flags_need_expert_parallel(monkeypatch, capsys, flags, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before joining a process group
    with pytest.raises(SystemExit):
        main(["train", *flags, "--steps", "1"])
    assert message in capsys.readouterr().err


def _refusals_worker(rank, world_size, result_dir):
    with pytest.raises(UsageError, match=r"--expert-parallel-size 3 must divide the number of processes \(2\)"):
        FullyShardedExpertParallel(3)
    with pytest.raises(UsageError, match=r"--expert-parallel-size 0 must divide"):
        FullyShardedExpertParallel(0)
    with pytest.raises(UsageError, match=r"placement of blocks.0.ffn gives copies of experts \(\[\[0, 1\], \[1, 2\]\]\)"):
        FullyShardedExpertParallel(2, {"blocks.0.ffn": Placement(((0, 1), (1, 2)), 3)})
    with pytest.raises(UsageError, match="placement of every layer is over 2 devices, the experts over "
                                         "--expert-parallel-size 1; plan it with "
                                         "`moekit plan-placement --devices 1`"):
        FullyShardedExpertParallel(1, [[0, 1], [2, 3]])
    with pytest.raises(UsageError, match="placement of blocks.1.ffn is over 3 devices, the experts over "
                                         "2 processes; plan it with `moekit plan-placement --devices 2`"):
        DataExpertParallel({"blocks.1.ffn": Placement(((0,), (1,), (2,)), 3)})
    # Under FSDP the placement is over the ep ranks, not over every process.
    one_rank = {"blocks.0.ffn": [[2, 0, 3, 1]]}
    assert FullyShardedExpertParallel(1, one_rank).placement == one_rank
    dense = MoETransformer(dataclasses.replace(_configs()[0], moe=None))
    with pytest.raises(UsageError, match="--fsdp shards the experts of MoE blocks, and this model has none"):
        FullyShardedExpertParallel(2).prepare(dense)


def test_fsdp_refuses_sizes_that_do_not_divide_placements_with_copies_and_dense_models(tmp_path):
    run_distributed(_refusals_worker, 2, tmp_path, timeout_s=120)


def _weights_problem_worker(rank, world_size, result_dir):
    parallel = FullyShardedExpertParallel(2)
    model = parallel.prepare(MoETransformer(_configs()[0]))
    assert weights_problem(model, parallel) is None
    if rank == 1:  # a NaN in this rank's experts only
        with torch.no_grad():
            parallel.local_shard(model.blocks[1].ffn.experts.down_proj)[0, 0, 0] = float("nan")
    expected = "blocks.1.ffn.experts.down_proj" if rank == 1 else "a parameter on another rank"
    assert weights_problem(model, parallel) == f"{expected} holds non-finite values after the optimizer step"


def test_non_finite_weights_are_found_in_any_rank_shard(tmp_path):
    run_distributed(_weights_problem_worker, 2, tmp_path, timeout_s=120)
