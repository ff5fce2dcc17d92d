"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers send before a kill).

The first signal only sets a flag: the trainer finishes the optimizer step it
is in, saves a checkpoint and stops with ``TrainingStopped``. A second signal
is ignored, so the save goes on until it is on disk; a third aborts at once
(``TrainingStopped`` raised where the program is), and a save in progress
removes its temporary folder. The exit status is 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM), the shell and scheduler convention.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABORT_AFTER = 3  # the signal that aborts without waiting for the save


class TrainingStopped(KeyboardInterrupt):
    """Training ended on a signal (after saving, or aborted by a third signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print
    os.write(2, (text + "\n").encode())


class StopRequests:
    """Inside ``with StopRequests() as stop``, SIGINT and SIGTERM set ``stop.signum``
    instead of interrupting; the previous handlers come back on exit. Outside the
    main thread (where Python cannot install handlers) nothing is installed."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, object] = {}
        self._closing = False
        self._while_closing: list[int] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:  # the run has ended: the previous handler gets it after __exit__
            self._while_closing.append(signum)
            return
        self.count += 1
        self.signum = self.signum or signum
        name = signal.Signals(signum).name
        if self.count >= ABORT_AFTER:
            raise TrainingStopped(f"aborted by a third {name} without saving", signum)
        if self.count == 1:
            _say(f"{name}: finishing this optimizer step, then saving a checkpoint and stopping")
        else:
            _say(f"{name}: still stopping (the checkpoint is being made durable); "
                 "one more aborts without saving")

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        # A signal handled while the handlers are being restored must not raise here (that
        # would leave the others installed): it is kept and sent again once they are back.
        self._closing = True
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        for signum in self._while_closing:
            signal.raise_signal(signum)

    def stopped(self, message: str) -> TrainingStopped:
        """The exception that ends the run after its checkpoint is saved."""
        signum = self.signum or signal.SIGTERM
        return TrainingStopped(f"{signal.Signals(signum).name}: {message}", signum)
