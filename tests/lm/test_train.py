"""The training loop: schedule, learning, metrics, exact resume, run-folder safety."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from moekit.lm.checkpoint import CheckpointError, checkpoint_dirs
from moekit.lm.train import learning_rate, train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = tiny_train_config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    mid = 10 + (100 - 10 - 1) / 2
    assert learning_rate(int(mid), cfg) == pytest.approx(0.55, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_training_lowers_validation_loss_and_writes_the_run_folder(tmp_path):
    corpus = synthetic_corpus()
    result = train(tiny_model_config(), tiny_train_config(steps=40, eval_every=20, save_every=20),
                   corpus, tmp_path / "run", progress=False, log=lambda _: None)
    assert result.finished and result.step == 40
    assert result.val_loss < corpus.unigram_loss() - 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_loss"] == pytest.approx(result.val_loss)
    last = train_records[-1]
    assert len(last["tokens_per_expert"]) == 2 and len(last["tokens_per_expert"][0]) == 4
    # 2 steps per log line, each 2 x 16 tokens routed to k=2 experts
    assert sum(last["tokens_per_expert"][0]) == 2 * 2 * 16 * 2
    assert {"loss", "aux_loss", "lr", "tokens_per_second", "dropped_fraction",
            "load_max_over_mean", "grad_norm"} <= set(last)
    assert train_records[0]["loss"] > train_records[-1]["loss"]
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000020", "step-00000040"]
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("moe_fields", [
    {},
    {"score_func": "sigmoid", "bias_update_rate": 1e-2, "router_noise": "gaussian"},
], ids=["softmax", "sigmoid-bias-noise"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, moe_fields):
    model_cfg, corpus = tiny_model_config(**moe_fields), synthetic_corpus()
    train_cfg = tiny_train_config(steps=8, save_every=100, eval_every=4, grad_accum=2)
    quiet = dict(progress=False, log=lambda _: None)
    straight = train(model_cfg, train_cfg, corpus, tmp_path / "straight", **quiet)
    first = train(model_cfg, train_cfg, corpus, tmp_path / "resumed", stop_after=4, **quiet)
    assert not first.finished and first.step == 4
    resumed = train(model_cfg, train_cfg, corpus, tmp_path / "resumed", resume=True, **quiet)
    assert resumed.finished
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.val_loss == straight.val_loss

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, lines)]

    assert losses("resumed") == losses("straight")


def test_resume_from_a_corrupt_checkpoint_names_it_and_keeps_the_older_one(tmp_path):
    quiet = dict(progress=False, log=lambda _: None)
    model_cfg, train_cfg, corpus = tiny_model_config(), tiny_train_config(steps=8, save_every=2), synthetic_corpus()
    train(model_cfg, train_cfg, corpus, tmp_path / "run", stop_after=4, **quiet)
    newest = checkpoint_dirs(tmp_path / "run")[-1]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000004 is corrupt.*older checkpoints: step-00000002"):
        train(model_cfg, train_cfg, corpus, tmp_path / "run", resume=True, **quiet)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000002", "step-00000004"]


def test_run_folder_guards(tmp_path):
    quiet = dict(progress=False, log=lambda _: None)
    model_cfg, train_cfg, corpus = tiny_model_config(), tiny_train_config(steps=2), synthetic_corpus()
    train(model_cfg, train_cfg, corpus, tmp_path / "run", **quiet)
    with pytest.raises(ValueError, match="exists and is not empty"):
        train(model_cfg, train_cfg, corpus, tmp_path / "run", **quiet)
    with pytest.raises(CheckpointError, match=r"configs given differ from .*config.json "
                                              r"\(train.lr: run 0.01, given 0.5\).*only steps may change"):
        train(model_cfg, tiny_train_config(steps=2, lr=0.5), corpus, tmp_path / "run", resume=True, **quiet)
    with pytest.raises(CheckpointError, match=r"\(dtype: run 'float32', given 'bfloat16'\)"):
        train(model_cfg, train_cfg, corpus, tmp_path / "run", resume=True, dtype=torch.bfloat16, **quiet)
    with pytest.raises(CheckpointError, match="no config.json"):
        train(model_cfg, train_cfg, corpus, tmp_path / "empty", resume=True, **quiet)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        train(model_cfg, tiny_train_config(seq_len=64), corpus, tmp_path / "long", **quiet)


def test_dense_model_trains_and_reports_no_expert_counts(tmp_path):
    from moekit.lm.config import LMConfig

    dense = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=32, max_seq_len=32)
    result = train(dense, tiny_train_config(steps=4), synthetic_corpus(), tmp_path / "dense",
                   progress=False, log=lambda _: None)
    assert math.isfinite(result.val_loss)
    last = json.loads((tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()[-2])
    assert last["tokens_per_expert"] == [] and last["aux_loss"] == 0.0


def test_autocast_training_learns_is_stored_and_resumes_exactly(tmp_path, monkeypatch):
    """--autocast bfloat16: the MoE layers' experts run in bfloat16 (their router in float32),
    the run learns, the setting travels with the run, and a resume continues bitwise."""
    from moekit.layer import MoE

    seen = []
    original = MoE.forward

    def recording_forward(self, x, *args, **kwargs):
        y, aux = original(self, x, *args, **kwargs)
        seen.append((y.dtype, aux.router_logits.dtype))
        return y, aux

    monkeypatch.setattr(MoE, "forward", recording_forward)
    corpus, quiet = synthetic_corpus(), dict(progress=False, log=lambda _: None)
    train_cfg = tiny_train_config(steps=40, eval_every=20, save_every=100, autocast="bfloat16")
    result = train(tiny_model_config(), train_cfg, corpus, tmp_path / "run", **quiet)
    assert result.val_loss < corpus.unigram_loss() - 0.5
    assert (torch.bfloat16, torch.float32) in seen  # training forwards
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["autocast"] == "bfloat16"
    short = tiny_train_config(steps=6, save_every=100, eval_every=3, autocast="bfloat16")
    straight = train(tiny_model_config(), short, corpus, tmp_path / "straight", **quiet)
    train(tiny_model_config(), short, corpus, tmp_path / "resumed", stop_after=3, **quiet)
    resumed = train(tiny_model_config(), short, corpus, tmp_path / "resumed", resume=True, **quiet)
    assert resumed.val_loss == straight.val_loss
    with pytest.raises(ValueError, match="autocast must be one of 'none', 'bfloat16', 'float16'"):
        tiny_train_config(autocast="fp8")


@pytest.mark.parametrize("failing", ["save_file", "torch_save", "metrics"])
def test_a_write_failure_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                   failing):
    import errno

    from moekit.lm import checkpoint as ckpt
    from moekit.lm import train as train_module

    run = tmp_path / "run"
    denied = PermissionError(errno.EACCES, "Permission denied", str(run / "checkpoints"))
    calls = []

    def fail_the_second(original):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise denied
            return original(*args, **kwargs)
        return wrapper

    if failing == "save_file":
        monkeypatch.setattr(ckpt, "save_file", fail_the_second(ckpt.save_file))
    elif failing == "torch_save":
        monkeypatch.setattr(ckpt.torch, "save", fail_the_second(ckpt.torch.save))
    else:
        from types import SimpleNamespace

        monkeypatch.setattr(train_module, "json", SimpleNamespace(dumps=fail_the_second(json.dumps)))
    what = "metrics.jsonl" if failing == "metrics" else "the checkpoint of step 4"
    with pytest.raises(CheckpointError, match=rf"cannot write .*{what}: Permission denied \(.*checkpoints\); "
                                              r"the newest complete checkpoint is step-00000002; free disk "
                                              r"space or make .* writable, then `moekit train --resume"):
        train(tiny_model_config(), tiny_train_config(steps=6, save_every=2, log_every=2), synthetic_corpus(),
              run, progress=False, log=lambda _: None)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002"]
    assert not list((run / "checkpoints").glob(".step-*"))
