"""SIGINT and SIGTERM: the step finishes, a checkpoint is saved, and the resumed run is bitwise
the uninterrupted one; a second signal is ignored, a third aborts and leaves no temporary folder."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.lm import checkpoint as ckpt
from moekit.lm.signals import StopRequests, TrainingStopped
from moekit.lm.train import train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(progress=False, log=lambda _: None)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / ckpt.MODEL_FILE)), load_file(str(b / ckpt.MODEL_FILE))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_first_signal_sets_the_flag_second_is_ignored_third_aborts():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM and stop.count == 1
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.count == 2 and stop.signum == signal.SIGTERM  # the first signal decides
        with pytest.raises(TrainingStopped, match="aborted by a third SIGINT") as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert info.value.exit_status == 130
        assert stop.stopped("saved").exit_status == 143
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_while_the_handlers_are_restored_reaches_the_previous_handler(monkeypatch):
    """A third signal that lands while __exit__ restores the handlers (a real race: the run
    has just ended) neither raises there, leaving the other handler installed, nor is lost:
    it goes to the previous handler once both are back."""
    got = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in
                (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopRequests().__enter__()
        stop.count = 2  # the next one would abort
        restore = signal.signal

        def restore_with_a_signal_between(signum, handler):
            result = restore(signum, handler)
            if signum == signal.SIGINT:  # SIGINT restored, SIGTERM not yet
                stop._handle(signal.SIGTERM, None)
            return result

        monkeypatch.setattr(signal, "signal", restore_with_a_signal_between)
        stop.__exit__(None, None, None)
        monkeypatch.setattr(signal, "signal", restore)
        assert signal.getsignal(signal.SIGTERM) is not stop._handle
        assert signal.getsignal(signal.SIGINT) is not stop._handle
        time.sleep(0.01)
        assert got == [signal.SIGTERM]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_self_during(monkeypatch, count: int, signum=signal.SIGINT, at_step: int = 4):
    """Send ``count`` signals to this process from inside the trainer_state.pt write of at_step."""
    original = ckpt.torch.save

    def save(state, path):
        if isinstance(state, dict) and state.get("step") == at_step:
            for _ in range(count):
                os.kill(os.getpid(), signum)
                time.sleep(0.01)
        return original(state, path)

    monkeypatch.setattr(ckpt.torch, "save", save)


def test_signals_during_a_save_wait_for_it_and_the_resume_is_exact(tmp_path, monkeypatch):
    model_cfg, corpus = tiny_model_config(), synthetic_corpus()
    train_cfg = tiny_train_config(steps=8, save_every=2, eval_every=3)
    straight = train(model_cfg, train_cfg, corpus, tmp_path / "straight", **QUIET)
    _signal_self_during(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="SIGTERM: saved step 4 in .*--resume") as info:
        train(model_cfg, train_cfg, corpus, tmp_path / "run", **QUIET)
    assert info.value.exit_status == 143
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000004"
    monkeypatch.undo()
    resumed = train(model_cfg, train_cfg, corpus, tmp_path / "run", resume=True, **QUIET)
    assert resumed.val_loss == straight.val_loss
    assert _same_weights(tmp_path / "straight", tmp_path / "run")


def test_a_third_signal_aborts_the_save_and_removes_its_temporary_folder(tmp_path, monkeypatch):
    model_cfg, corpus = tiny_model_config(), synthetic_corpus()
    train_cfg = tiny_train_config(steps=6, save_every=2, eval_every=3)
    _signal_self_during(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="aborted by a third SIGINT without saving; the newest "
                                              "checkpoint in .* is step-00000002"):
        train(model_cfg, train_cfg, corpus, tmp_path / "run", **QUIET)
    root = tmp_path / "run" / ckpt.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    monkeypatch.undo()
    stale = root / ".step-00000004.tmp"  # what a kill -9 during a save leaves
    stale.mkdir()
    (stale / ckpt.MODEL_FILE).write_bytes(b"half")
    messages = []
    train(model_cfg, train_cfg, corpus, tmp_path / "run", resume=True, progress=False,
          log=messages.append)
    assert not stale.exists() and any(f"removed {stale}" in m for m in messages)
    train(model_cfg, train_cfg, corpus, tmp_path / "straight", **QUIET)
    assert _same_weights(tmp_path / "straight", tmp_path / "run")


def test_an_interrupted_swap_of_the_same_step_is_moved_back(tmp_path):
    from moekit.lm.model import MoETransformer

    folder = ckpt.save_checkpoint(tmp_path, 3, MoETransformer(tiny_model_config()).state_dict(), {"step": 3})
    os.replace(folder, folder.with_name(".step-00000003.old"))  # cut between the two renames
    ckpt.remove_temporary_files(tmp_path)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000003"]


def _ask(worker: subprocess.Popen, line: str) -> str:
    worker.stdin.write(line + "\n")
    worker.stdin.flush()
    return worker.stdout.readline().strip()


def test_real_signals_at_random_moments_resume_bitwise_equal(tmp_path):
    """One child process trains tiny runs; the test sends SIGINT or SIGTERM (once, twice,
    or three times) at a random moment of each, the child resumes, and every run must
    end with the reference's weights."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "tests.lm.signal_worker"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        assert _ask(worker, f"reference {tmp_path / 'reference'}") == "started"
        duration = float(worker.stdout.readline().split()[-1])
        rng, outcomes, budget = random.Random(0), collections.Counter(), time.monotonic() + 35
        trials = 0
        while time.monotonic() < budget and trials < 40:
            folder = tmp_path / f"trial{trials}"
            signum = rng.choice([signal.SIGINT, signal.SIGTERM])
            count = rng.choice([1, 1, 2, 3])
            assert _ask(worker, f"trial {folder}") == "started"
            time.sleep(rng.uniform(0, duration * 1.05))
            for _ in range(count):
                worker.send_signal(signum)
                time.sleep(rng.uniform(0, 0.02))
            worker.stdin.write("sent\n")
            worker.stdin.flush()
            done = worker.stdout.readline().split()
            assert done[0] == "done", done
            kind, phase = done[1], done[3]
            assert _same_weights(tmp_path / "reference", folder), (signum, count, done)
            assert not list((folder / ckpt.CHECKPOINTS).glob(".step-*")), done
            outcomes[(kind, phase)] += 1
            trials += 1
    finally:
        worker.stdin.close()
        worker.wait(timeout=30)
    print(f"\n{trials} trials, every one bitwise equal to the uninterrupted run: {dict(outcomes)}")
    assert trials >= 10
    assert sum(n for (kind, _), n in outcomes.items() if kind == "stopped") >= 3
