"""The moekit command: train, resume, generate, compare, params, and its errors (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moekit.cli import main

from ..lm.helpers import write_text_files

SMALL = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
         "--save-every", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture
def data_dir(tmp_path):
    return str(write_text_files(tmp_path / "data", count=30, size=300))


def test_train_writes_the_run_and_reports(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", data_dir, "--out", str(out), "--num-experts", "4",
                 "--top-k", "1", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "unigram baseline" in printed and str(out) in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["moe"]["num_experts"] == 4 and config["model"]["moe"]["top_k"] == 1
    assert config["train"]["steps"] == 4 and config["preset"] == "tiny"
    for name in ("model.safetensors", "metrics.jsonl", "loss.png", "expert_load.png"):
        assert (out / name).is_file(), name


def test_train_with_null_experts_logs_their_share(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", data_dir, "--out", str(out), "--num-null-experts", "2",
                 *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "null experts took" in printed and "tokens/s" in printed
    assert json.loads((out / "config.json").read_text())["model"]["moe"]["num_null_experts"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [r["null_fraction"] for r in records if r["kind"] == "train"]
    assert shares and all(0 <= share <= 1 for share in shares)


def test_train_takes_null_expert_kind_and_batch_invariant(tmp_path, data_dir):
    out = tmp_path / "run"
    assert main(["train", "--data", data_dir, "--out", str(out), "--num-null-experts", "1",
                 "--null-expert-kind", "copy", "--batch-invariant", *SMALL]) == 0
    moe = json.loads((out / "config.json").read_text())["model"]["moe"]
    assert moe["null_expert_kind"] == "copy" and moe["batch_invariant"] is True


def test_stop_and_resume_from_the_command_line(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    main(["train", "--data", data_dir, "--out", str(out), "--stop-after", "2", *SMALL])
    assert "continue with `moekit train --resume" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_resume_is_bound_to_the_stored_config_except_steps(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    main(["train", "--data", data_dir, "--out", str(out), "--dtype", "bfloat16", "--stop-after", "2",
          *SMALL])
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["data"] == data_dir
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(out), "--dtype", "float32", "--lr", "0.5", "--preset", "dense",
              "--num-experts", "16", "--data", str(tmp_path), "--seq-len", "16", "--steps", "6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moekit train: error: --resume continues {out} "
                                                   "with its stored config; these flags differ from it: ")
    for conflict in ("--dtype float32 (run: bfloat16)", "--lr 0.5 (run: 0.003)", "--preset dense (run: tiny)",
                     f"--data {tmp_path} (run: {data_dir})"):
        assert conflict in err, conflict
    assert "--seq-len" not in err and "--num-experts" not in err  # equal to the run's: accepted
    assert main(["train", "--resume", str(out), "--steps", "6", "--seq-len", "16", "--no-progress"]) == 0
    assert "steps 4 -> 6" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}


def test_generate_prints_the_prompt_and_new_text(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    main(["train", "--data", data_dir, "--out", str(out), *SMALL])
    capsys.readouterr()
    assert main(["generate", "--run", str(out), "--prompt", "def ", "--max-new-tokens", "20",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a flipped bit in the weights
    weights.write_bytes(bytes(data))
    for extra in ([], ["--offload-experts"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--run", str(out), "--max-new-tokens", "5", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moekit generate: error: {weights} is corrupt: it does not match the "
                              f"SHA-256 in {out / 'manifest.json'}") and err.count("\n") == 1


def test_compare_prints_equal_steps_and_equal_time_over_seeds(tmp_path, data_dir, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", data_dir, "--out", str(out), "--seeds", "2",
                 "--timing-repeats", "1", *SMALL]) == 0  # the sweep: tests/lm/test_comparison.py
    printed = capsys.readouterr().out
    for line in ("| tiny (MoE) | 4 |", "| dense, equal steps | 4 |", "| dense, equal time |",
                 "tiny - dense at equal steps:", "tiny - dense at equal time:"):
        assert line in printed
    for name in ("compare.json", "timing.json", "summary.json", "compare.png",
                 "runs/moe-seed1/model.safetensors", "runs/dense_time-seed0/result.json"):
        assert (out / name).is_file(), name
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0  # all done: the table again
    assert "| tiny (MoE) | 4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--resume", str(out), "--seeds", "3"])
    assert exit_info.value.code == 2
    assert "drop --seeds" in capsys.readouterr().err


def test_params_lists_and_counts(capsys):
    assert main(["params", "mixtral-8x7b"]) == 0
    printed = capsys.readouterr().out
    assert "46.70B" in printed and "12.88B" in printed
    assert main(["params", "tiny"]) == 0
    assert "routed experts" in capsys.readouterr().out
    assert main(["params", "--list"]) == 0
    assert "deepseek-v3" in capsys.readouterr().out


def test_bench_is_a_subcommand_with_the_benchmark_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--shapes" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/path"], "does not exist"),
    (["train", "--preset", "dense", "--num-experts", "4"], "is dense"),
    (["train", "--top-k", "17"], "top_k"),
    (["train", "--num-null-experts", "-1"], "num_null_experts"),
    (["train", "--steps", "0"], "steps must be >= 1"),
    (["generate", "--run", "/no/such/run"], "not a run folder"),
    (["params", "gpt-5"], "unknown preset or architecture"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "--shape", "16,1024,896,8"], "five integers T,D,F,E,K, got '16,1024,896,8'"),
    (["bench", "--shape", "16,1024,896,2,4"], "K <= E, got '16,1024,896,2,4'"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "x")] if argv[0] == "train" else argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "moekit", "params", "--list"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "tiny" in done.stdout


def test_sigterm_saves_and_exits_143_with_one_line_then_resume_finishes(tmp_path, data_dir, capsys,
                                                                      monkeypatch):
    import os
    import signal

    from moekit.lm import checkpoint

    original = checkpoint.torch.save

    def save_and_get_a_sigterm(state, path):  # the scheduler's SIGTERM arrives during step 2's save
        os.kill(os.getpid(), signal.SIGTERM)
        return original(state, path)

    monkeypatch.setattr(checkpoint.torch, "save", save_and_get_a_sigterm)
    out = tmp_path / "run"
    assert main(["train", "--data", data_dir, "--out", str(out), *SMALL]) == 143
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"moekit train: stopped: SIGTERM: saved step 2 in {out}; continue with "
                       f"`moekit train --resume {out}`")
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out


def test_a_diverging_run_is_one_line_naming_the_step(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", data_dir, "--out", str(tmp_path / "run"), *SMALL, "--lr", "1e38"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: training diverged at step ") and err.count("\n") == 1
