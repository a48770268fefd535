"""A detector rebuilt from a checkpoint alone: its embedded, resolved config describes the model, and its
weights fill it.

This is what ``detkit eval``, ``infer``, ``export`` and ``proposals eval --checkpoint`` run; reading and
validating the file is :func:`detkit.engine.checkpoint.load_checkpoint`'s, building the detector
:func:`detkit.models.assembly.build_detector`'s.
"""
from __future__ import annotations

import torch

from detkit.config import apply_overrides, bind_parts, from_dict
from detkit.engine.checkpoint import CheckpointError, load_checkpoint
from detkit.models.assembly import build_detector


def model_from_checkpoint(path: str, registries, device: torch.device, overrides: list[str] | None = None):
    """Rebuild the model a checkpoint was trained with; returns ``(model, cfg, ckpt)`` (the model on ``device``,
    in eval mode; ``overrides`` are ``KEY=VALUE`` changes to the embedded config)."""
    ckpt = load_checkpoint(path, map_location="cpu", task="detection")
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
