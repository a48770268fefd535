"""One stage of SGD on the configured detector: the :class:`Trainer`.

Training is iteration-based SGD with momentum and weight decay, a linear warmup
and step decay of the learning rate (Faster R-CNN Sec. 3.3: 0.001 for 60k
mini-batches, then 0.0001 for 20k on VOC). The trainer never assumes one device:
the model, the batches and the optimizer follow ``train.device``, and the loop
itself reads values back to the host only on logging iterations (the model's
forward still synchronises where sizes depend on the data: NMS outputs, boolean
selections; ``make gpu-check`` counts them), so a DistributedDataParallel wrapper
can be added around the model without changing the loop.

Resuming is exact: the data order is a function of (seed, sample position), and
each sample's augmentation and its anchor and RoI sampling are seeded by its
position (the loader puts that seed in the target as ``sample_seed``). The torch
RNG, which draws the rest (multi-scale sizes, dropout), is saved with the
checkpoint and restored when the number of processes is unchanged; so is the
fp16 gradient scaler (its scale decides which steps are skipped).

The number of processes does not change the training either: N processes with
``data.batch_size`` B train as one process with batch N*B (tests/training/test_distributed.py
and test_multinode.py: the same weights within 1e-6). Each process takes its
slice of one global sample stream, a sample's draws depend only on its position,
DDP averages the gradients of the per-process mean losses, and the logged losses
are the mean over the processes. This holds when
  - every image adds as many sampled anchors and RoIs to the losses as the others
    (the losses are means over a process's samples: a mean of per-process means
    is the global mean only then), i.e. every image fills ``batch_size_per_image``
    in both samplers (``roi_heads.bg_iou_thresh_lo > 0`` can leave an image too few
    background RoIs);
  - no layer uses batch statistics: frozen batch norm, or ``train.sync_bn`` (CUDA);
  - ``train.scale_lr`` is off (it multiplies the learning rate by the number of
    processes);
  - nothing else draws from the global RNG (seeded ``train.seed + rank``): no
    dropout, one ``transform.min_size``;
  - the images of a global batch have one size after resizing (each process pads
    only its own images, and the padding changes the features near the border
    and the anchor grid the sampler draws over).
Agreement is up to float rounding (the gradient sums run in another order); CPU
and CUDA draw different numbers.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from detkit.config import Config, ConfigError
from detkit.data.loading import build_checked_dataset, build_dataset, training_loader
from detkit.data.transforms import build_transform
from detkit.engine.devices import autocast
from detkit.engine.state_dict import WeightsError
from detkit.evaluation.runner import evaluate, label_categories
from detkit.models.assembly import build_detector
from detkit.proposals.attach import attach_proposals
from detkit.training.base import SGDTrainer, find_last_checkpoint, lr_factor, run_checkpoints, seed_everything
from detkit.training.loop import Hook
from detkit.training.validation import PeriodicValidation, Validator

__all__ = ["StageInit", "Trainer", "adopt_class_names", "find_last_checkpoint", "lr_factor", "resolve_frozen_bn",
           "run_checkpoints", "seed_everything", "train_stage"]

log = logging.getLogger(__name__)

#: a staged schedule's ``init(model)``: loads earlier stages' weights, freezes parts, returns the modules kept fixed
StageInit = Callable[[nn.Module], Iterable[nn.Module] | None]


class Trainer(SGDTrainer):
    """SGD on the detector ``cfg.model`` describes, trained on ``data.train``, in ``train.work_dir``.

    Runs as one process, or as one of N under ``torchrun`` (DistributedDataParallel; logging, checkpoints
    and the metric on rank 0); what it shares with every run is :class:`detkit.training.base.SGDTrainer`'s.
    The dataset's classes become ``model.num_classes`` and ``model.class_names``.

    A staged schedule passes ``init(model)`` (load earlier stages' weights, freeze what a step keeps fixed;
    called before the optimizer is built; it returns the modules to keep in eval mode, or None), ``loss_prefixes`` (train only the losses of some stages, e.g.
    ``("rpn/",)``) and ``proposals`` (a proposal source ``get(index)`` for the training set).
    """

    def __init__(self, cfg: Config, registries, *, progress: bool = True,
                 init: StageInit | None = None, loss_prefixes: tuple[str, ...] | None = None,
                 proposals=None):
        self.loss_prefixes = loss_prefixes
        self._init, self._proposals = init, proposals
        self.validator = Validator(self, cfg.train.best_metric)  # train.eval_period, best.pth
        super().__init__(cfg, registries, progress=progress)

    # -------------------------------------------------------------------------------------------- build

    def _build_dataset(self):
        cfg, aug = self.cfg, self.cfg.data.augment
        try:
            transform = build_transform(train=True, hflip=aug.hflip, scale=aug.scale, crop=aug.crop,
                                        color_jitter=aug.color_jitter)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        dataset = build_checked_dataset(cfg.data.train, self.registries, "train", transform=transform,
                                        skip_empty=cfg.data.skip_empty)
        if len(dataset) == 0:
            raise ConfigError("data.train: the dataset has no images")
        if cfg.train.eval_at_end and cfg.data.test:  # the run ends by evaluating: its classes must be the model's
            test = build_dataset(cfg.data.test, self.registries, "test")
            try:
                label_categories(list(dataset.class_names), list(test.class_names), list(test.cat_ids))
            except ConfigError as exc:
                raise ConfigError(f"data.test: {exc}; the run would end with an evaluation it cannot score "
                                  f"(train.eval_at_end): give a test set of the training set's classes") from None
        if cfg.train.eval_period and cfg.data.val:  # validated while it trains: the same
            val = self.validator.validation_set()
            try:
                label_categories(list(dataset.class_names), list(val.class_names), list(val.cat_ids))
            except ConfigError as exc:
                raise ConfigError(f"data.val: {exc} (train.eval_period validates on it)") from None
        return dataset

    def _build_model(self) -> nn.Module:
        cfg, tcfg = self.cfg, self.cfg.train
        names = adopt_class_names(cfg, self.dataset)
        resolve_frozen_bn(cfg)
        try:
            model = build_detector(cfg.model, self.registries, len(names), names).to(self.device)
        except WeightsError as exc:
            raise ConfigError(f"model.backbone.weights: {exc}") from None
        self.fixed = tuple(self._init(model) or ()) if self._init is not None else ()
        if self._proposals is not None:
            self.dataset.proposals = self._proposals
        else:
            attach_proposals(self.dataset, model, self.progress, self.info)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
            model.channels_last = True
        if tcfg.compile:
            model.trunk.compile()  # in place: parameter names (and so checkpoints) are unchanged
        return model

    def _loader(self):
        return training_loader(self.dataset, self.cfg.data, self.cfg.train.seed, self.position, self.info.rank,
                               self.info.world_size, pin_memory=self.device.type == "cuda", skip_unreadable=True)

    # -------------------------------------------------------------------------------------------- run

    def step(self) -> dict[str, Tensor]:
        """One SGD step on the next batch; returns its loss dict (``loss_prefixes`` applied)."""
        images, targets, proposals = self._to_device(self.next_batch())
        with autocast(self.device, self.cfg.train.amp):
            losses = self.ddp(images, targets, proposals)
        if self.loss_prefixes is not None:
            losses = {k: v for k, v in losses.items() if k.startswith(self.loss_prefixes)}
        return self.optimize(losses)

    def _to_device(self, batch) -> tuple[list[Tensor], list[dict], list[Tensor] | None]:
        images, targets, proposals = batch
        self.count_unreadable(r for t in targets for r in t.get("unreadable", ()))
        device = self.device
        images = [img.to(device, non_blocking=True) for img in images]
        if proposals is not None:
            proposals = [p.to(device, non_blocking=True) for p in proposals]
        targets = [{"boxes": t["boxes"].to(device, non_blocking=True),
                    "labels": t["labels"].to(device, non_blocking=True),
                    "sample_seed": t["sample_seed"]} for t in targets]
        return images, targets, proposals

    # -------------------------------------------------------------------------------------------- results

    def checkpoint_meta(self) -> dict:
        return {"class_names": self.cfg.model.class_names, "cat_ids": list(self.dataset.cat_ids),
                "extra": self.validator.best.state()}

    def restore_meta(self, ckpt: dict) -> None:
        self.validator.best.restore(ckpt)

    def extra_hooks(self) -> list[Hook]:
        return [PeriodicValidation(self.validator)] if self.cfg.train.eval_period else []

    def evaluate(self) -> dict | None:
        """The metrics on ``data.test`` when ``train.eval_at_end`` (rank 0; None elsewhere or without)."""
        if not (self.cfg.train.eval_at_end and self.cfg.data.test):
            return None
        self.model.eval()
        metrics = evaluate(self.model, self.cfg, self.registries, device=self.device,
                           out_dir=self.cfg.train.work_dir, dist_info=self.info, progress=self.progress)
        if self.cfg.train.eval_period:  # the end-of-run evaluation may be the best one
            self.validator.best.consider(self.cfg.train.max_iters, metrics)
        return metrics


def train_stage(cfg: Config, registries, resume: str | bool | None = None, progress: bool = True, *,
                init: StageInit | None = None, loss_prefixes: tuple[str, ...] | None = None,
                proposals=None) -> dict:
    """One stage of SGD (a :class:`Trainer` run); returns ``{"checkpoint", "metrics", "model"}``."""
    trainer = Trainer(cfg, registries, progress=progress, init=init, loss_prefixes=loss_prefixes,
                      proposals=proposals)
    return trainer.train(resume)


# ----------------------------------------------------------------------------- helpers


def adopt_class_names(cfg: Config, dataset) -> list[str]:
    """The training set's classes become ``model.num_classes`` and ``model.class_names`` (a configured
    ``num_classes`` must agree)."""
    names = list(dataset.class_names)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(names):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.train has {len(names)} classes "
                          f"({', '.join(names)})")
    cfg.model.num_classes = len(names)
    cfg.model.class_names = names
    return names


def resolve_frozen_bn(cfg: Config) -> None:
    """Fix ``model.backbone.frozen_bn`` (default: frozen when pretrained weights are loaded) once, so the
    checkpoint's config rebuilds the same module types without the weights file."""
    if cfg.model.backbone.frozen_bn is None:
        cfg.model.backbone.frozen_bn = bool(cfg.model.backbone.weights)
