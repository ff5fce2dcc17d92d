"""Data + expert parallel training with FSDP2 (--fsdp): the same run as one process, and
checkpoints that resume in one process without FSDP."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from moekit.lm.distributed import FullyShardedExpertParallel
from moekit.lm.train import train

from ..distributed import run_distributed
from .helpers import synthetic_corpus
from .test_distributed import QUIET, _assert_same_run, _configs


def _fsdp_train_worker(rank, world_size, result_dir, run_dir, expert_parallel_size, stop_after, resume):
    model_cfg, train_cfg = _configs()
    train(model_cfg, train_cfg, synthetic_corpus(), run_dir, stop_after=stop_after, resume=resume,
          parallel=FullyShardedExpertParallel(expert_parallel_size), **QUIET)


@pytest.mark.parametrize("expert_parallel_size", [pytest.param(1, id="dp2-ep1"),
                                                  pytest.param(2, id="dp1-ep2")])
def test_fsdp_training_at_two_processes_equals_one_process(tmp_path, expert_parallel_size):
    model_cfg, train_cfg = _configs()
    assert train(model_cfg, train_cfg, synthetic_corpus(), tmp_path / "one", **QUIET).finished
    run_distributed(_fsdp_train_worker, 2, tmp_path / "two-work", str(tmp_path / "two"),
                    expert_parallel_size, None, False, timeout_s=240)
    experts = load_file(str(tmp_path / "two" / "model.safetensors"))["blocks.0.ffn.experts.down_proj"]
    assert experts.shape[0] == model_cfg.moe.num_experts
    _assert_same_run(tmp_path / "two", tmp_path / "one")


def test_runs_move_between_one_process_and_fsdp(tmp_path):
    """One process to step 2, FSDP at dp1/ep2 to step 4, one process to the end: the same
    losses and weights as a run that never stopped."""
    model_cfg, train_cfg = _configs()
    assert train(model_cfg, train_cfg, synthetic_corpus(), tmp_path / "straight", **QUIET).finished
    run_dir = tmp_path / "moved"
    train(model_cfg, train_cfg, synthetic_corpus(), run_dir, stop_after=2, **QUIET)
    run_distributed(_fsdp_train_worker, 2, tmp_path / "work", str(run_dir), 2, 4, True, timeout_s=240)
    assert train(model_cfg, train_cfg, synthetic_corpus(), run_dir, resume=True, **QUIET).finished
    _assert_same_run(run_dir, tmp_path / "straight")
