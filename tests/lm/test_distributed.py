"""Data + expert parallel training: the same run as one process, checkpoints that move between sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.lm.config import LMConfig, TrainConfig
from moekit.lm.distributed import DataExpertParallel
from moekit.lm.train import train

from ..distributed import run_distributed
from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config

QUIET = dict(progress=False, log=lambda _: None)
REPO = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, lines)]


def _assert_same_run(actual: Path, expected: Path) -> None:
    got, want = _losses(actual), _losses(expected)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    torch.testing.assert_close(torch.tensor([g[2] for g in got], dtype=torch.float64),
                               torch.tensor([w[2] for w in want], dtype=torch.float64), rtol=1e-5, atol=0)
    a, b = load_file(str(Path(actual) / "model.safetensors")), load_file(str(Path(expected) / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def _configs() -> tuple[LMConfig, TrainConfig]:
    model_cfg = tiny_model_config(num_experts=4, top_k=2, num_shared_experts=1, balance_loss_weight=0.05,
                                  z_loss_weight=0.01)
    return model_cfg, tiny_train_config(steps=6, batch_size=4, grad_accum=2, grad_clip=0.05, eval_every=2)


def _train_worker(rank, world_size, result_dir, run_dir, stop_after, resume, placement=None):
    model_cfg, train_cfg = _configs()
    parallel = DataExpertParallel(placement)
    if rank == 0:
        with pytest.raises(ValueError, match="batch_size 3 must be divisible by the number of processes"):
            parallel.check_batch_size(3)
    train(model_cfg, train_cfg, synthetic_corpus(), run_dir, stop_after=stop_after, resume=resume,
          parallel=parallel, **QUIET)


def test_checkpoint_written_at_two_processes_resumes_at_one_and_at_two(tmp_path):
    model_cfg, train_cfg = _configs()
    straight = train(model_cfg, train_cfg, synthetic_corpus(), tmp_path / "straight", **QUIET)
    assert straight.finished
    for resumed_at in (1, 2):
        run_dir = tmp_path / f"resumed-at-{resumed_at}"
        run_distributed(_train_worker, 2, tmp_path / f"first-{resumed_at}", str(run_dir), 4, False)
        # the checkpoint holds one-process weights: every expert, in one file
        experts = load_file(str(run_dir / "model.safetensors"))["blocks.0.ffn.experts.down_proj"]
        assert experts.shape[0] == model_cfg.moe.num_experts
        if resumed_at == 1:
            train(model_cfg, train_cfg, synthetic_corpus(), run_dir, resume=True, **QUIET)
        else:
            # resumed with experts placed out of order (as from moekit plan-placement)
            placement = {"blocks.0.ffn": [[3, 0], [2, 1]], "blocks.1.ffn": [[1, 2], [0, 3]]}
            run_distributed(_train_worker, 2, tmp_path / "second", str(run_dir), None, True, placement)
        _assert_same_run(run_dir, tmp_path / "straight")


def _cli_flags(tmp_path: Path) -> list[str]:
    """Flags of a short CLI run of the tiny preset with 4 experts on a small data folder."""
    text = tmp_path / "data"
    text.mkdir()
    for i in range(12):
        (text / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    return ["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
            "--num-experts", "4", "--data", str(text), "--no-progress"]


def _torchrun_train(*args: str) -> subprocess.CompletedProcess:
    """`moekit train --expert-parallel *args` on 2 torchrun processes; asserts it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "moekit", "train", "--expert-parallel", *args],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return launched


def test_torchrun_expert_parallel_cli_equals_one_process(tmp_path):
    flags = _cli_flags(tmp_path)
    launched = _torchrun_train("--out", str(tmp_path / "two"), *flags)
    assert launched.stdout.count("step 4: validation loss") == 1  # only rank 0 logs
    assert main(["train", "--out", str(tmp_path / "one"), *flags]) == 0
    _assert_same_run(tmp_path / "two", tmp_path / "one")


def _grad_norms(run_dir: Path) -> list[float]:
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["grad_norm"] for r in records if "grad_norm" in r]


def test_torchrun_with_copies_of_experts_equals_one_process_and_resumes(tmp_path):
    flags = _cli_flags(tmp_path)
    for name, experts_per_device in [("copies-a", [[0, 1, 2], [3, 0, 1]]), ("copies-b", [[2, 3, 1], [0, 3, 2]])]:
        layers = {f"blocks.{i}.ffn": {"num_experts": 4, "experts_per_device": experts_per_device}
                  for i in (1, 2, 3)}
        (tmp_path / f"{name}.json").write_text(json.dumps({"layers": layers}))
    _torchrun_train("--out", str(tmp_path / "two"), "--placement", str(tmp_path / "copies-a.json"),
                    "--stop-after", "2", *flags)
    # resumed with other experts copied: the checkpoint holds one copy of each expert
    _torchrun_train("--resume", str(tmp_path / "two"), "--placement", str(tmp_path / "copies-b.json"),
                    "--no-progress")
    # one process, stopped and resumed alike (a stop logs the steps since the last record)
    assert main(["train", "--out", str(tmp_path / "one"), "--stop-after", "2", *flags]) == 0
    assert main(["train", "--resume", str(tmp_path / "one"), "--no-progress"]) == 0
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    # the clipped norm counts each expert once, not once per copy
    got, want = _grad_norms(tmp_path / "two"), _grad_norms(tmp_path / "one")
    assert len(got) == len(want) > 0
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_expert_parallel_flag_outside_torchrun_says_how_to_launch(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["train", "--expert-parallel", "--steps", "1"])
    assert "torchrun --nproc-per-node 2 -m moekit train --expert-parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--placement", "plan.json", "--steps", "1"])
    assert "--placement places experts over processes: it needs --expert-parallel" in capsys.readouterr().err


def test_data_expert_parallel_without_a_process_group_says_how_to_launch():
    with pytest.raises(ValueError, match="needs torch.distributed initialised; launch with torchrun"):
        DataExpertParallel()
