"""What is checked before a training run builds anything: the paths of the config and its work directory.

A run should fail in its first second, not after hours: the pretrained weights file, the test set (when
the run ends with an evaluation: its annotations and that every image file exists and is non-empty; the
training set is checked the same way by the trainer, before it builds the model) and the work directory,
which must be writable, must not be in use by another run (:func:`work_dir_lock`) and must not hold a
finished run unless ``--resume`` continues it or ``--overwrite`` replaces it. Temporaries that an interrupted checkpoint write left behind are removed.
"""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from detkit.config import Config, ConfigError
from detkit.data.loading import build_checked_dataset, with_absolute_paths
from detkit.data.media import check_input_file, check_output_dir
from detkit.engine.checkpoint import TEMPORARY_PATTERN, remove_stale_temporaries
from detkit.engine.files import directory_lock
from detkit.training.validation import check_validation_settings

log = logging.getLogger(__name__)

#: the files a run writes in its work directory (and a staged schedule in each stage's), which
#: ``--overwrite`` removes so that the old run's checkpoints, log and metrics are not mixed with the new ones
RUN_FILES = ("final.pth", "best.pth", "iter_*.pth", TEMPORARY_PATTERN, "log.jsonl", "metrics.json", "results.json",
             "backbone.pth")


@contextmanager
def work_dir_lock(work_dir: str) -> Iterator[None]:
    """The run's hold on ``train.work_dir`` (:func:`detkit.engine.files.directory_lock`), taken by rank 0 of a
    job before anything in the directory is read, cleared or written: a second run into it is refused, naming
    the first, instead of interleaving their checkpoints and log (or clearing the first's files with
    ``--overwrite``)."""
    check_output_dir(work_dir, "train.work_dir")
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with directory_lock(work_dir, "train.work_dir"):
        yield


def check_before_training(cfg: Config, registries, resume: str | bool | None, overwrite: bool) -> None:
    """Raise ConfigError, MediaError (a path) or the dataset's own error for a config whose run cannot
    succeed, touching nothing: the options, the weights file, the test set (and, where ``overwrite`` would
    remove an earlier run, the training set), the work directory's path. The
    caller then takes :func:`work_dir_lock` and prepares the directory (:func:`prepare_work_dir`) under it.
    Every process of a ``torchrun`` job calls both; only rank 0 locks and removes files."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.work_dir and --overwrite replaces it: give one of them")
    check_weights_file(cfg.model.backbone.weights)
    check_output_dir(cfg.train.work_dir, "train.work_dir")
    if cfg.train.eval_at_end and cfg.data.test:
        build_checked_dataset(cfg.data.test, registries, "test")
    check_validation_settings(cfg)
    if cfg.train.eval_period and cfg.data.val:
        build_checked_dataset(cfg.data.val, registries, "val")
    if overwrite and os.path.isdir(cfg.train.work_dir) and any(os.scandir(cfg.train.work_dir)):
        # --overwrite is about to remove the earlier run: the training set is read and checked first, so that a
        # run that cannot start leaves the earlier one where it was
        build_checked_dataset(cfg.data.train, registries, "train")


def make_paths_absolute(cfg: Config, registries) -> None:
    """The paths of ``data.train``, ``data.test`` (those their formats declare) and ``model.backbone.weights``
    made absolute, relative ones taken from the working directory: the config every checkpoint embeds then
    finds its data from any directory (``detkit eval CKPT``, ``export`` without ``--images``)."""
    cfg.data.train = with_absolute_paths(cfg.data.train, registries.datasets)
    cfg.data.test = with_absolute_paths(cfg.data.test, registries.datasets)
    cfg.data.val = with_absolute_paths(cfg.data.val, registries.datasets)
    if cfg.model.backbone.weights:
        cfg.model.backbone.weights = os.path.abspath(os.path.expanduser(cfg.model.backbone.weights))


def check_weights_file(path: str | None) -> None:
    """``model.backbone.weights``, when given, must be a readable, non-empty local file (its contents are
    checked when the backbone loads it)."""
    if not path:
        return
    check_input_file(path, "model.backbone.weights")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"model.backbone.weights: {path}: the file is empty")


def prepare_work_dir(work_dir: str, resume: str | bool | None, overwrite: bool) -> None:
    """Refuse a work directory holding a finished run (unless resumed or overwritten), clear it with
    ``overwrite``, remove stale temporaries, and check that it can be written (or created)."""
    check_output_dir(work_dir, "train.work_dir")
    final = os.path.join(work_dir, "final.pth")
    if os.path.isfile(final) and not resume and not overwrite:
        raise ConfigError(f"train.work_dir={work_dir} holds a finished run ({final}); training again would overwrite "
                          f"it and mix the two runs' checkpoints. Continue that run with --resume (e.g. after raising "
                          f"train.max_iters), train into another directory with --set train.work_dir=NEW_DIR, or "
                          f"replace the old run with --overwrite")
    if int(os.environ.get("RANK", "0")) == 0 and os.path.isdir(work_dir):
        if overwrite:
            removed = clear_run(work_dir)
            if removed:
                log.info("--overwrite: removed %d files of the earlier run in %s", len(removed), work_dir)
        for path in remove_stale_temporaries(work_dir):
            log.info("removed %s, left by a checkpoint write that was interrupted", path)


def clear_run(work_dir: str) -> list[str]:
    """Remove the :data:`RUN_FILES` of the run in ``work_dir`` and of each subdirectory holding checkpoints
    (a staged schedule's stages); returns the removed paths. Nothing else (data, caches) is touched."""
    def has_checkpoints(directory: str) -> bool:
        return any(glob.glob(os.path.join(glob.escape(directory), p)) for p in ("final.pth", "iter_*.pth"))

    stages = [entry.path for entry in os.scandir(work_dir) if entry.is_dir() and has_checkpoints(entry.path)]
    removed = []
    for directory in [work_dir, *sorted(stages)]:
        for pattern in RUN_FILES:
            for path in sorted(glob.glob(os.path.join(glob.escape(directory), pattern))):
                os.remove(path)
                removed.append(path)
    return removed
