"""``detkit pretrain``: a registered backbone trained as an N-way classifier (R-CNN Sec. 2.3: "supervised
pre-training" before detection fine-tuning), with everything detection training has.

:class:`ClassifierTrainer` is an :class:`~detkit.training.base.SGDTrainer`: the same ``train:`` section,
learning-rate schedules (``train.lr_policy: step | cosine``), atomic checkpoints and exact ``--resume``,
mixed precision, channels-last, ``torch.compile``, ``torchrun``/DDP and the non-finite guard. A step
normalises the uint8 batch on the device, runs the backbone (its auxiliary classifiers too, in training)
and takes its ``classification_loss``; training top-1/top-5 are counted on the device and read only on
logging iterations. Validation (``data.test``) runs every ``eval.period`` iterations and at the end, into
the same ``log.jsonl``. The run writes ``final.pth`` (a detkit checkpoint, ``task: classification``),
``backbone.pth`` (the backbone's state dict, which ``model.backbone.weights`` of a detector loads),
``training_curves.png``, and at the end ``metrics.json`` and ``confusion_matrix.png``.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

from detkit.engine.checkpoint import atomic_torch_save
from detkit.classification.evaluate import classification_metrics, predict, write_report
from detkit.classification.loading import build_classification_dataset, training_batches
from detkit.classification.model import build_classifier, input_side, main_logits
from detkit.classification.transforms import ClassifierAugment
from detkit.config import ClassifierConfig, ConfigError
from detkit.engine.devices import autocast
from detkit.engine.distributed import mean_over_ranks
from detkit.training.base import SGDTrainer, check_train_settings
from detkit.training.loop import Hook
from detkit.training.validation import BestCheckpoint
from detkit.training.preflight import check_weights_file, prepare_work_dir, work_dir_lock

log = logging.getLogger(__name__)

TASK = "classification"


class ClassifierTrainer(SGDTrainer):
    """SGD on ``model.backbone`` as a classifier of ``data.train``'s classes (see the module doc)."""

    task = TASK

    def __init__(self, cfg: ClassifierConfig, registries, *, progress: bool = True):
        self.size = 0  # the input side, known once the backbone is built
        self._test_set = None  # data.test, built at the first validation
        self.best = BestCheckpoint(self, "top1")  # best.pth, with eval.period
        super().__init__(cfg, registries, progress=progress)
        self._hits = torch.zeros(2, device=self.device)  # top-1, top-5 hits since the last log
        self._seen = torch.zeros((), device=self.device)
        self.validation: dict | None = None  # the last validation's metrics

    def _build_dataset(self):
        cfg = self.cfg
        dataset = build_classification_dataset(cfg.data.train, self.registries, "train")
        if len(dataset) == 0:
            raise ConfigError("data.train: the dataset has no images")
        names = list(dataset.class_names)
        if len(names) < 2:
            raise ConfigError(f"data.train: one class ({', '.join(names)}); a classifier learns to tell at least "
                              f"two apart")
        return dataset

    def use_test_set(self, test) -> None:
        """Validate on ``test`` (``data.test``, built by the caller), whose classes must be the training set's in
        the same order: labels are positions in these lists, so other lists would score misaligned labels."""
        names, given = list(self.dataset.class_names), list(test.class_names)
        if given != names:
            raise ConfigError(f"data.test: its classes ({_listed(given)}) are not data.train's ({_listed(names)}), "
                              f"in that order; validation would compare labels of different classes")
        self._test_set = test

    def _build_model(self) -> nn.Module:
        cfg, tcfg = self.cfg, self.cfg.train
        names = list(self.dataset.class_names)
        if cfg.model.num_classes is not None and cfg.model.num_classes != len(names):
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.train has {len(names)} classes "
                              f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        cfg.model.num_classes, cfg.model.class_names = len(names), names
        model = build_classifier(cfg.model, self.registries, len(names)).to(self.device)
        self.size = cfg.model.input_size = input_side(cfg.model, model)  # saved resolved, for eval-cls
        try:
            self.dataset.transform = ClassifierAugment(self.size, cfg.data.augment)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if tcfg.compile:
            model.backbone.compile()  # in place: parameter names (and so checkpoints) are unchanged
        return model

    def _loader(self):
        return training_batches(self.dataset, self.cfg.data, self.cfg.train.seed, self.position, self.info.rank,
                                self.info.world_size, pin_memory=self.device.type == "cuda")

    def step(self) -> dict[str, Tensor]:
        images, labels, unreadable = self.next_batch()
        if unreadable:
            self.count_unreadable(unreadable)
        images = images.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.train.amp):
            outputs = self.ddp(images)
            loss = self.model.loss(outputs, labels)
        self._count_hits(main_logits(outputs).detach(), labels)
        return self.optimize({"cls/loss": loss})

    def _count_hits(self, logits: Tensor, labels: Tensor) -> None:
        top = logits.topk(min(5, logits.shape[1]), 1).indices == labels[:, None]
        self._hits += torch.stack([top[:, 0].sum(), top.any(1).sum()]).float()
        self._seen += labels.numel()

    def log_metrics(self) -> dict[str, Tensor]:
        rates = mean_over_ranks(self._hits / self._seen.clamp_min(1), self.info)
        self._hits.zero_()
        self._seen.zero_()
        return {"top1/train": rates[0], "top5/train": rates[1]}

    def extra_hooks(self) -> list[Hook]:
        return [PeriodicValidation(self)] if self.cfg.eval.period and self.cfg.data.test else []

    # -------------------------------------------------------------------------------------------- results

    def validate(self, done: int, ten_crop: bool = False) -> dict:
        """Top-1/top-5 on ``data.test`` (rank 0), appended to the log; training mode restored."""
        if self._test_set is None:
            self._test_set = build_classification_dataset(self.cfg.data.test, self.registries, "test")
        probs, labels = predict(self.model, self._test_set, self.size, self.cfg.data.augment.test_resize, self.device,
                                self.cfg.data.batch_size, self.cfg.data.num_workers, ten_crop=ten_crop)
        metrics = classification_metrics(probs, labels, self.cfg.model.class_names)
        self.logger.log_scalars(done, {"top1/val": metrics["top1"], "top5/val": metrics["top5"],
                                       "loss/val": metrics["loss"]})
        log.info("iteration %d: validation top-1 %.4f, top-%d %.4f (%d images)", done, metrics["top1"],
                 metrics["top5_k"], metrics["top5"], metrics["count"])
        self._set_train_mode()
        self.validation = metrics
        if self.cfg.eval.period:
            self.best.consider(done, metrics)
        return metrics

    def checkpoint_meta(self) -> dict:
        return {"class_names": self.cfg.model.class_names, "cat_ids": [], "extra": {"task": TASK, **self.best.state()}}

    def restore_meta(self, ckpt: dict) -> None:
        self.best.restore(ckpt)

    def write_outputs(self) -> None:
        """``backbone.pth``, and the final validation's report (``metrics.json``, ``confusion_matrix.png``)."""
        work_dir = self.cfg.train.work_dir
        path = os.path.join(work_dir, "backbone.pth")
        atomic_torch_save(self.model.backbone.weights_state_dict(), path)  # its weights layout recorded
        log.info("saved %s (model.backbone.weights of a detector)", path)
        if self.cfg.train.eval_at_end and self.cfg.data.test:
            metrics = self.validate(self.cfg.train.max_iters, ten_crop=self.cfg.eval.ten_crop)
            write_report(metrics, work_dir, f"{self.cfg.model.backbone.name}: top-1 {metrics['top1']:.1%} "
                                            f"({'10 crops' if self.cfg.eval.ten_crop else 'centre crop'})")

    def evaluate(self) -> dict | None:
        return self.validation if self.cfg.train.eval_at_end else None


class PeriodicValidation(Hook):
    """Validation every ``eval.period`` iterations before the last (rank 0; the last one is the final
    evaluation), before a checkpoint of the same iteration."""

    def __init__(self, trainer: ClassifierTrainer):
        self.trainer = trainer

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        trainer = self.trainer
        if trainer.info.is_main and done % trainer.cfg.eval.period == 0 and done < trainer.cfg.train.max_iters:
            trainer.validate(done)


def pretrain(cfg: ClassifierConfig, registries, resume: str | bool | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Train the configured backbone as a classifier; returns ``{"checkpoint", "metrics", "model"}``. The
    weights file, the work directory (a finished run is refused unless ``resume`` or ``overwrite``) and the
    test set are checked before anything is built."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.work_dir and --overwrite replaces it: give one of them")
    check_train_settings(cfg.train)
    check_weights_file(cfg.model.backbone.weights)
    test = None
    if cfg.data.test and (cfg.train.eval_at_end or cfg.eval.period):
        test = build_classification_dataset(cfg.data.test, registries, "test")
    with work_dir_lock(cfg.train.work_dir):
        trainer = ClassifierTrainer(cfg, registries, progress=progress)  # reads the training set; writes nothing
        if test is not None:
            trainer.use_test_set(test)  # its classes checked before --overwrite clears anything
        prepare_work_dir(cfg.train.work_dir, resume, overwrite)
        return trainer.train(resume)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


__all__ = ["ClassifierTrainer", "PeriodicValidation", "pretrain"]
