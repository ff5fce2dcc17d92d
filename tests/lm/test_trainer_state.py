"""A trainer state that disagrees with itself (torn, edited, malicious) is refused with one clear line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from moekit.lm import checkpoint as ckpt
from moekit.lm.train import train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config

QUIET = dict(progress=False, log=lambda _: None)
MODEL, TRAIN = tiny_model_config(), tiny_train_config(steps=6, save_every=2, grad_accum=2)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("state") / "run"
    train(MODEL, TRAIN, synthetic_corpus(), run, stop_after=2, **QUIET)
    return run


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _torn(state):
    for values in state["optimizer"]["state"].values():
        values["step"] = values["step"] + 1
    return state


TAMPERINGS = {
    "torn optimizer": (_torn, ("the optimizer has taken 3 steps but the checkpoint is of step 2; "
                               "the state is torn")),
    "missing keys": (lambda s: {k: v for k, v in s.items() if k not in ("data_rng", "optimizer")},
                     "lacks data_rng, optimizer; it is not a complete trainer state"),
    "short rng": (lambda s: {**s, "data_rng": s["data_rng"][:100]},
                  r"data_rng must be a torch generator state \(uint8 \[5056\]\), got torch.uint8 \(100,\)"),
    "negative step": (lambda s: {**s, "step": -1}, "step must be an integer >= 0, got -1"),
    "other step": (lambda s: {**s, "step": 4}, "step 4 disagrees with its checkpoint's step 2"),
    "data position": (lambda s: {**s, "data_batches": 3},
                      r"data_batches 3 disagrees with step 2 x grad_accum 2 = 4"),
    "not a dict": (lambda s: [1, 2], "is not a trainer state: it holds a list"),
    "older, without data_batches": (lambda s: {k: v for k, v in s.items() if k != "data_batches"}, None),
    "malicious pickle": (lambda s: {**s, "elapsed_seconds": _RunsCode()},
                         ("holds objects other than tensors and plain values, so it is not loaded "
                          r"\(loading it could run code\)")),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_tampered_state_whose_hashes_verify_is_refused_and_an_older_one_is_not(stopped_run, tmp_path, monkeypatch, case):
    tamper, message = TAMPERINGS[case]
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    checkpoint = ckpt.latest_checkpoint(run)
    state_file = checkpoint / ckpt.STATE_FILE
    torch.save(tamper(torch.load(state_file, weights_only=True)), state_file)
    manifest = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())
    manifest["sha256"][ckpt.STATE_FILE] = ckpt._sha256(state_file)  # the tamperer fixes the hash
    (checkpoint / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    if message is None:  # still accepted
        assert train(MODEL, TRAIN, synthetic_corpus(), run, resume=True, **QUIET).finished
        return
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        train(MODEL, TRAIN, synthetic_corpus(), run, resume=True, **QUIET)
    text = str(info.value)
    assert str(state_file) in text and "weights_only=False" not in text and "\n" not in text
    assert not (tmp_path / "pwned").exists()


def test_a_manifest_of_another_step_is_refused(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    checkpoint = ckpt.latest_checkpoint(run)
    manifest = json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())
    (checkpoint / ckpt.MANIFEST_FILE).write_text(json.dumps({**manifest, "step": 7}))
    with pytest.raises(ckpt.CheckpointError, match="step-00000002 is corrupt: its manifest.json is of step 7"):
        train(MODEL, TRAIN, synthetic_corpus(), run, resume=True, **QUIET)
