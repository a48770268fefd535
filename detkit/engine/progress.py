"""The one progress bar: tqdm on a terminal, nothing where the output is redirected.

A bar redraws itself with carriage returns, which fill a redirected log (a file, a scheduler's job output) with
hundreds of partial lines, so a bar is drawn only where stderr is a terminal (:func:`on_terminal`). Training
logs one plain line per ``train.log_period`` instead (``training.loop.TrainingLog``).
"""
from __future__ import annotations

import sys
from typing import Any


def progress_bar(iterable=None, *, enabled: bool = True, **options: Any):
    """``tqdm(iterable, **options)`` when ``enabled`` and stderr is a terminal; otherwise a tqdm that draws nothing
    (it still iterates and counts)."""
    from tqdm import tqdm

    options = {"dynamic_ncols": True, "mininterval": 1.0, **options}
    return tqdm(iterable, disable=not (enabled and on_terminal()), **options)


def on_terminal() -> bool:
    """Whether stderr, where progress is drawn, is a terminal."""
    return sys.stderr.isatty()
