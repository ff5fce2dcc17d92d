"""One writer per run folder: a second training or resume names the holder's PID; readers
are unaffected; the lock goes with its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from moekit.errors import UsageError
from moekit.lm.checkpoint import load_run_model
from moekit.lm.run_lock import LOCK_FILE, RunLock
from moekit.lm.train import train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config

QUIET = dict(progress=False, log=lambda _: None)


def test_a_second_writer_is_refused_with_the_holders_pid_and_readers_are_not(tmp_path):
    run, corpus = tmp_path / "run", synthetic_corpus()
    model_cfg, train_cfg = tiny_model_config(), tiny_train_config(steps=4, save_every=2)
    train(model_cfg, train_cfg, corpus, run, stop_after=2, **QUIET)
    with RunLock(run):
        in_use = rf"{run} is in use by another training \(PID {os.getpid()}\); wait for it"
        with pytest.raises(UsageError, match=in_use):
            train(model_cfg, train_cfg, corpus, run, resume=True, **QUIET)
        with pytest.raises(UsageError, match=in_use):
            train(model_cfg, train_cfg, corpus, run, **QUIET)
        load_run_model(run)  # a reader takes no lock
    assert train(model_cfg, train_cfg, corpus, run, resume=True, **QUIET).finished  # released


def test_the_lock_goes_with_a_killed_process(tmp_path):
    holder = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
              "print('locked', flush=True)\n"
              "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / LOCK_FILE)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"in use by another training \(PID {child.pid}\)"):
            with RunLock(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"cannot create the run folder .*file/run: Not a directory"):
        with RunLock(tmp_path / "file" / "run"):
            pass
