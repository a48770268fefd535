"""Where a training run's numbers go: loggers, a kind of part (``train.loggers: [{name: tensorboard}, ...]``,
``detkit list loggers``; a plugin registers its own with ``detkit_register_loggers``).

The trainer hands every logger the same things: scalars at an iteration (each loss, their total, the learning
rate, seconds per iteration, data-loading seconds, peak memory, images per second, the ETA, and at each
validation ``val/AP``...), pictures (the evaluation report's, at the end of the run) and the resolved config
once. Only the main process (rank 0) builds loggers. A resumed run starts each logger at the iteration it
resumes from: what a logger holds beyond it (written after that checkpoint) is dropped, so no step is logged
twice. ``log.jsonl`` (:class:`JsonlLogger`) is always kept: the training curves, ``detkit compare`` and the
tests read it.

Built-in loggers: ``jsonl`` (``log.jsonl``, one JSON object per logged iteration), ``csv`` (``log.csv``, one
``iter,name,value`` row per number) and ``tensorboard`` (event files under ``tensorboard/`` through
``torch.utils.tensorboard``; ``pip install 'detkit[tensorboard]'``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from detkit.config import ConfigError, ranged
from detkit.engine.files import WriteError, write_text_atomic

log = logging.getLogger(__name__)


class Logger:
    """A logger's interface; each method may be left as it is (it does nothing)."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Numbers at iteration ``step`` (names such as ``roi/cls``, ``lr``, ``val/AP``)."""

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``(H, W, 3)`` uint8 RGB pictures at iteration ``step``."""

    def log_config(self, config: dict) -> None:
        """The resolved config (plain data), once at the start of a run."""

    def close(self) -> None:
        """Flush and release what it holds (the run ended, or failed)."""


def _appending(path: str):
    try:
        return open(path, "a", encoding="utf-8", newline="")
    except OSError as exc:
        raise WriteError(f"{path}: could not be opened for writing ({exc.strerror or exc})") from None


def _write(handle, path: str, text: str) -> None:
    try:
        handle.write(text)
        handle.flush()
    except OSError as exc:  # a full disk, a file-size limit, a directory made read-only
        raise WriteError(f"{path}: could not be written ({exc.strerror or exc})") from None


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLogger(Logger):
    """``log.jsonl``: one ``{"iter": step, <name>: value, ...}`` line per call (the trainer drops the lines
    after the iteration a run resumes from before it starts)."""

    def __init__(self, path: str):
        self.path = path
        self.file = _appending(path)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        _write(self.file, self.path, json.dumps({"iter": int(step), **values}) + "\n")

    def close(self) -> None:
        self.file.close()


@dataclass
class CsvSettings:
    """``train.loggers: [{name: csv, file: log.csv}]``."""

    file: str = "log.csv"  # in train.work_dir


class CsvLogger(Logger):
    """``log.csv``: a header ``iter,name,value`` and one row per number (long format: the names a run logs
    may change, e.g. at validations); rows after ``start_iter`` are dropped when a run resumes."""

    def __init__(self, path: str, start_iter: int):
        self.path = path
        fresh = not os.path.isfile(path) or os.path.getsize(path) == 0
        if not fresh:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= start_iter]
            if len(kept) != len(rows) - 1:
                buffer = io.StringIO()
                csv.writer(buffer, lineterminator="\n").writerows([["iter", "name", "value"], *kept])
                write_text_atomic(path, buffer.getvalue())
        self.file = _appending(path)
        self.writer = csv.writer(self.file, lineterminator="\n")
        if fresh:
            _write(self.file, path, "iter,name,value\n")

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([[int(step), k, repr(v)] for k, v in _finite(values).items()])
        _write(self.file, self.path, buffer.getvalue())

    def close(self) -> None:
        self.file.close()


@dataclass
class TensorBoardSettings:
    """``train.loggers: [{name: tensorboard, log_dir: tensorboard}]``: ``tensorboard --logdir WORK_DIR/tensorboard``."""

    log_dir: str = "tensorboard"  # in train.work_dir
    flush_secs: int = ranged(30, ge=1)  # how often events are written to the disk


class TensorBoardLogger(Logger):
    """TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``: scalars, images, the config as
    text. A resumed run purges the events after the iteration it resumes from (``purge_step``)."""

    def __init__(self, log_dir: str, start_iter: int, flush_secs: int = 30):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.loggers: tensorboard needs the tensorboard package: pip install "
                              "'detkit[tensorboard]' (make setup installs it)") from None
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_iter + 1 if start_iter else None,
                                    flush_secs=flush_secs)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in _finite(values).items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, int(step))

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for name, image in images.items():
            self.writer.add_image(name, image, int(step), dataformats="HWC")

    def log_config(self, config: dict) -> None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "\n```", 0)  # markdown: a code block keeps the layout

    def close(self) -> None:
        self.writer.close()


class Loggers(Logger):
    """Every logger of a run, called in turn (the trainer holds one; an empty one on ranks other than 0)."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = list(loggers)

    @property
    def takes_images(self) -> bool:
        """Whether a logger does something with pictures (pictures are only drawn for them)."""
        return any(getattr(type(logger), "log_images", None) not in (None, Logger.log_images)
                   for logger in self.loggers)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_scalars(step, values)

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for logger in self.loggers:
            logger.log_images(step, images)

    def log_config(self, config: dict) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()
