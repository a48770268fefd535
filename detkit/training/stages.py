"""What schedules that train in stages share (Faster R-CNN's 4-step training, R-CNN's fine-tuning before its
SVMs): each stage is one :class:`~detkit.training.Trainer` run in a directory of its own under
``train.work_dir``; a stage whose ``final.pth`` exists is not run again (``--resume`` continues an interrupted
one); the assembled detector is saved as ``work_dir/final.pth`` with its own config and evaluated.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os

from torch import nn

from detkit.config import Config, TrainConfig, to_dict
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.engine.devices import resolve_device
from detkit.evaluation.runner import evaluate
from detkit.models.assembly import build_detector
from detkit.training.trainer import find_last_checkpoint, resolve_frozen_bn, train_stage

log = logging.getLogger(__name__)


def resolved(cfg: Config) -> Config:
    """A copy whose BN mode is fixed once (later stages load weights from earlier ones, not from a file)."""
    cfg = copy.deepcopy(cfg)
    resolve_frozen_bn(cfg)
    return cfg


def file_digest(path: str) -> str:
    """The SHA-256 of a file (e.g. a stage's ``final.pth``, to name what was computed from it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_config(cfg: Config, name: str, max_iters: int | None = None) -> Config:
    """The config of stage ``name``: one trainer run in ``work_dir/name``, not evaluated; with ``max_iters``,
    that many iterations and the learning rate divided at three quarters of them."""
    stage = copy.deepcopy(cfg)
    stage.train.schedule = TrainConfig().schedule  # a stage is one run of the trainer
    stage.train.work_dir = os.path.join(cfg.train.work_dir, name)
    stage.train.eval_at_end = False
    if max_iters is not None:
        stage.train.max_iters = int(max_iters)
        stage.train.steps = [int(0.75 * max_iters)]
        stage.train.warmup_iters = min(stage.train.warmup_iters, int(max_iters))
    return stage


def run_stage(stage: Config, registries, resume, progress: bool, **trainer_args) -> tuple[nn.Module, dict]:
    """Train one stage (``trainer_args``: the :class:`~detkit.training.Trainer`'s ``init``, ``loss_prefixes``,
    ``proposals``), or load its result when its ``final.pth`` exists; returns ``(model, checkpoint)``."""
    final = os.path.join(stage.train.work_dir, "final.pth")
    if os.path.isfile(final):
        log.info("%s: done already (%s)", stage.train.work_dir, final)
    else:
        if resume and find_last_checkpoint(stage.train.work_dir) is None:
            resume = None
        train_stage(stage, registries, resume=resume, progress=progress, **trainer_args)
    ckpt = load_checkpoint(final)
    stage.model.num_classes = len(ckpt["class_names"])
    stage.model.class_names = list(ckpt["class_names"])
    rebuild = copy.deepcopy(stage.model)
    rebuild.backbone.weights = None  # the stage's weights are in its checkpoint
    model = build_detector(rebuild, registries, len(ckpt["class_names"]), list(ckpt["class_names"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def freeze(*modules: nn.Module) -> tuple[nn.Module, ...]:
    """Keep ``modules`` fixed in a stage: no gradients. Returns them: a stage's ``init`` returns the modules
    the trainer is to keep at test-time behaviour (eval mode, so batch-norm statistics do not drift)."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
    return modules


def finish(cfg: Config, registries, model: nn.Module, ckpt: dict, progress: bool) -> dict:
    """Save the assembled detector as ``work_dir/final.pth`` (with its own config and ``ckpt``'s classes and
    iteration) and evaluate it; returns ``{"checkpoint", "metrics", "model"}``."""
    cfg.model.num_classes = len(ckpt["class_names"])
    cfg.model.class_names = list(ckpt["class_names"])
    cfg.model.backbone.weights = None  # the weights are in the checkpoint
    final = os.path.join(cfg.train.work_dir, "final.pth")
    save_checkpoint(final, model_state=model.state_dict(), config=to_dict(cfg), iteration=ckpt["iteration"],
                    class_names=ckpt["class_names"], cat_ids=ckpt["cat_ids"])
    log.info("saved %s", final)
    metrics = None
    if cfg.train.eval_at_end and cfg.data.test:
        device = resolve_device(cfg.train.device)
        metrics = evaluate(model.to(device).eval(), cfg, registries, device=device, out_dir=cfg.train.work_dir,
                           progress=progress)
    return {"checkpoint": final, "metrics": metrics, "model": model}
