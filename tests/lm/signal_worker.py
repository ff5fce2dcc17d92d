"""A child process for tests/lm/test_signals.py: trains tiny runs that the test interrupts
with real signals, then resumes them, importing torch once for every trial.

Protocol, one line each way: the test sends ``reference DIR`` or ``trial DIR``; the
worker answers ``started`` when training begins; after a trial's training call ends
(stopped or finished) it waits for the test's ``sent`` (every signal is out), resumes
a stopped run to the end and answers ``done KIND STEP PHASE SECONDS``: KIND is
``stopped``, ``aborted`` or ``finished``, STEP the step it stopped at, PHASE where the
first signal landed.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from moekit.lm import signals
from moekit.lm.checkpoint import checkpoint_dirs
from moekit.lm.train import train

from .helpers import synthetic_corpus, tiny_model_config, tiny_train_config

MODEL = tiny_model_config(router_noise="gaussian", bias_update_rate=1e-2, score_func="sigmoid")
TRAIN = tiny_train_config(steps=30, grad_accum=2, eval_every=5, save_every=7, log_every=3)
PHASES = (("save", {"save", "save_checkpoint"}), ("evaluation", {"evaluate"}),
          ("optimizer step", {"step", "_single_tensor_adamw", "_multi_tensor_adamw", "adamw"}),
          ("backward", {"backward", "_engine_run_backward"}), ("forward", {"forward", "_call_impl"}),
          ("data", {"sample_batch"}), ("setup", {"_resume_state", "__init__", "prepare"}))


def phase_of(frame) -> str:
    """Where in the training call a signal's handler ran, from the Python stack."""
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return next((phase for phase, marks in PHASES if names & marks), "between")


def main() -> None:
    torch.set_num_threads(1)
    answers, sys.stdout = sys.stdout, sys.stderr  # the trainer's own prints stay off the protocol
    corpus = synthetic_corpus()
    landed: list[str] = []
    original = signals.StopRequests._handle

    def recording(self, signum, frame):
        if self.count == 0:
            landed.append(phase_of(frame))
        original(self, signum, frame)

    signals.StopRequests._handle = recording
    late = []  # signals that came after a training call had ended
    for signum in signals.SIGNALS:
        signal.signal(signum, lambda s, f: late.append(s))
    quiet = dict(progress=False, log=lambda _: None)
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        command, folder = line.split()
        landed.clear()
        started = time.perf_counter()
        print("started", file=answers, flush=True)
        kind, step = "finished", TRAIN.steps
        try:
            train(MODEL, TRAIN, corpus, folder, **quiet)
        except signals.TrainingStopped as stopped:
            kind = "stopped" if str(stopped).count("saved step") else "aborted"
            step = int(str(stopped).split("saved step ")[1].split()[0]) if kind == "stopped" else -1
        seconds = time.perf_counter() - started
        if command == "trial":
            assert sys.stdin.readline().strip() == "sent"
            time.sleep(0.05)  # let a signal still on its way reach the handler
        if kind != "finished":
            if not checkpoint_dirs(Path(folder)):  # aborted before the first checkpoint
                shutil.rmtree(folder)
                train(MODEL, TRAIN, corpus, folder, **quiet)
            else:
                train(MODEL, TRAIN, corpus, folder, resume=True, **quiet)
        phase = landed[0] if landed else "late"
        print(f"done {kind} {step} {phase.replace(' ', '_')} {seconds:.3f}", file=answers, flush=True)


if __name__ == "__main__":
    main()
