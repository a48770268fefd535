"""Checkpoints: self-contained (resolved config + class names + weights), written atomically.

A checkpoint alone is enough for ``detkit infer`` and ``detkit eval``: it holds
the resolved config and the class list next to the weights. Files are written to
a temporary name in the same directory and renamed, so an interrupted save never
leaves a half-written file or clobbers the previous one. Loading uses
``torch.load(weights_only=True)``: nothing in a checkpoint can execute code.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

FORMAT = "detkit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a (readable) detkit checkpoint."""


def atomic_torch_save(obj: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, *, model_state: dict, config: dict, iteration: int, class_names: list[str],
                    cat_ids: list[int], optimizer_state: dict | None = None, rng_state: dict | None = None,
                    samples_seen: int | None = None, world_size: int = 1, scaler_state: dict | None = None) -> None:
    """Write a checkpoint atomically. ``scaler_state`` is the fp16 gradient scaler's ``state_dict()``
    (empty for a disabled scaler); checkpoints written before it was saved have no ``"scaler"`` key."""
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
        },
        path,
    )


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a detkit checkpoint; errors name the file and what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a checkpoint we can read"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable detkit checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a detkit checkpoint (no '{FORMAT}' marker; a plain state dict or another tool's file?)"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer detkit (format version {ckpt['format_version']})")
    for key in ("config", "model", "class_names"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: detkit checkpoint is missing {key!r}")
    return ckpt


def model_from_checkpoint(path: str, registries, device: torch.device, overrides: list[str] | None = None):
    """Rebuild the model a checkpoint was trained with; returns ``(model, cfg, ckpt)`` (the model on ``device``,
    in eval mode; ``overrides`` are ``KEY=VALUE`` changes to the embedded config)."""
    from detkit.config import apply_overrides, bind_parts, from_dict
    from detkit.models.assembly import build_detector

    ckpt = load_checkpoint(path, map_location="cpu")
    data = apply_overrides(ckpt["config"], overrides or [])
    source = f"{path} (embedded config)"
    cfg = bind_parts(from_dict(data, source=source), registries, source)
    names = list(ckpt["class_names"])
    # Weights come from the checkpoint; the backbone's own file is not needed (or read) again.
    cfg.model.backbone.weights = None
    model = build_detector(cfg.model, registries, len(names), names)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, ckpt

