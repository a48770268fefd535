"""Stopping a command on SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's stop) so that its clean-up runs.

Python's default SIGTERM ends the process at once: no ``finally`` runs, so a file being written stays behind as
its temporary. Inside :func:`stop_on_signals` both signals raise :class:`Stopped` in the main thread instead;
the atomic writes (:mod:`detkit.engine.files`) then remove their temporaries and the command exits with
128 + the signal's number (130, 143), as a shell reports a process the signal ended. The CLI runs every command
inside it; training's loop installs its own handlers while it runs (``training.loop.StopOnSignal``: the step
finishes and a checkpoint is saved first).
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A signal stopped the command. A KeyboardInterrupt, so that a library's ``except Exception`` passes it on
    and code that handles Ctrl-C (a DataLoader worker ends quietly on one) treats SIGTERM alike; ``exit_code``
    is 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {self.name}")


def _raise(signum, frame) -> None:
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise :class:`Stopped` (also where the parent shell left SIGINT
    ignored, as it does for a background job: ``kill -INT`` still stops it); the handlers before are restored
    after. Outside the main thread signals cannot be handled and the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
