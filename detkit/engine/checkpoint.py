"""Checkpoints: self-contained (resolved config + class names + weights), written atomically.

A checkpoint alone is enough for ``detkit infer`` and ``detkit eval``: it holds
the resolved config and the class list next to the weights. Files are written to
a temporary name in the same directory and renamed, so an interrupted save never
leaves a half-written file or clobbers the previous one (a kill during the write leaves
a ``.tmp-*.pth`` beside it, which the next training run in that directory removes:
:func:`remove_stale_temporaries`). Loading uses ``torch.load(weights_only=True)``:
nothing in a checkpoint can execute code. Weights holding a NaN or an infinity are
never written, and a checkpoint holding them (from an older detkit) is refused.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Mapping

import torch

from detkit.engine.files import atomic_write
from detkit.engine.state_dict import WeightsError, load_tensors

FORMAT = "detkit-checkpoint"
FORMAT_VERSION = 1
#: the temporary names :func:`atomic_torch_save` writes to before the rename: ``.tmp-<random>.pth``
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".tmp-", ".pth"
TEMPORARY_PATTERN = f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"


class CheckpointError(ValueError):
    """A file that is not a (readable) detkit checkpoint."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint (to read or to write) whose weights hold NaN or infinite values."""


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state`` holding a NaN or an infinity, in order (one host
    read for all of them)."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all().to(state[names[0]].device) for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def describe_tensors(bad: list[str], total: int, shown: int = 5) -> str:
    """``"49 of 56 tensors: a, b, c, d, e, ..."``."""
    more = ", ..." if len(bad) > shown else ""
    return f"{len(bad)} of {total} tensors: {', '.join(bad[:shown])}{more}"


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the ``.tmp-*.pth`` files an interrupted checkpoint write left in ``directory``; returns them.
    Call it only where no other process is writing checkpoints to the directory (at the start of a run)."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), TEMPORARY_PATTERN))):
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically, through a temporary named as ``TEMPORARY_PATTERN`` says."""
    with atomic_write(path, suffix=TEMPORARY_SUFFIX, prefix=TEMPORARY_PREFIX) as f:
        torch.save(obj, f)


def save_checkpoint(path: str, *, model_state: dict, config: dict, iteration: int, class_names: list[str],
                    cat_ids: list[int], optimizer_state: dict | None = None, rng_state: dict | None = None,
                    samples_seen: int | None = None, world_size: int = 1, scaler_state: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write a checkpoint atomically. ``scaler_state`` is the fp16 gradient scaler's ``state_dict()``
    (empty for a disabled scaler); checkpoints written before it was saved have no ``"scaler"`` key.
    ``extra``: more top-level entries (a classifier's ``"task": "classification"``).
    Raises NonFiniteCheckpointError, writing nothing, when a weight of ``model_state`` is NaN or infinite."""
    bad = nonfinite_tensors(model_state)
    if bad:
        raise NonFiniteCheckpointError(f"{path}: not written: the weights hold non-finite values "
                                       f"({describe_tensors(bad, len(model_state))})")
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config,
            "iteration": int(iteration),
            "class_names": list(class_names),
            "cat_ids": [int(c) for c in cat_ids],
            "model": model_state,
            "optimizer": optimizer_state,
            "rng": rng_state,
            "scaler": scaler_state,
            "samples_seen": samples_seen,
            "world_size": int(world_size),
            **(extra or {}),
        },
        path,
    )


#: each kind of checkpoint: what it holds, and what to do with it (for the message when one is given to the
#: other's commands)
TASKS = {"detection": ("a detector", "detkit train; use it with detkit eval / infer / train --resume"),
         "classification": ("a classifier", "detkit pretrain; use it with detkit eval-cls / pretrain --resume, "
                                            "and its backbone.pth as model.backbone.weights")}


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", task: str | None = None) -> dict:
    """Read and validate a detkit checkpoint; errors (CheckpointError) name the file and what is wrong. A
    checkpoint whose weights hold NaN or infinite values is refused (NonFiniteCheckpointError); with ``task``
    (``detection`` or ``classification``), so is a checkpoint of the other task."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = load_tensors(path, "detkit checkpoint", map_location)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a detkit checkpoint (no '{FORMAT}' marker; a plain state dict or another tool's file?)"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer detkit (format version {ckpt['format_version']})")
    for key in ("config", "model", "class_names"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: detkit checkpoint is missing {key!r}")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: the checkpoint's 'model' is a {type(ckpt['model']).__name__}, not a state dict")
    kind = ckpt.get("task", "detection")
    if task is not None and kind != task:
        (held, usage), (wanted, _) = TASKS.get(kind, (kind, "?")), TASKS.get(task, (task, "?"))
        raise CheckpointError(f"{path}: this checkpoint holds {held} ({usage}), not {wanted}")
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise NonFiniteCheckpointError(
            f"{path}: the checkpoint's weights hold non-finite values ({describe_tensors(bad, len(ckpt['model']))})"
            f": it was saved by a training run that diverged, and eval, infer and --resume refuse it; use an earlier "
            f"checkpoint of that run, or train again with a lower train.lr or with train.clip_grad_norm")
    return ckpt
