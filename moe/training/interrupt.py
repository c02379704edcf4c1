"""Ctrl-C during training: the first stops the run at the end of the current step (which
then checkpoints), a second interrupts at once."""

from __future__ import annotations

import signal
import sys
import threading


class StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step (and checkpoint there);
    a second one interrupts at once.  A no-op off the main thread, and where SIGINT is
    ignored (e.g. under nohup) or handled by someone else."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
