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
``data.batch_size`` B train as one process with batch N*B (tests/test_distributed.py
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

import json
import logging
import os
import random
import re
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from detkit.checkpoint import (CheckpointError, NonFiniteCheckpointError, load_checkpoint, remove_stale_temporaries,
                               save_checkpoint)
from detkit.config import Config, ConfigError, dump, to_dict
from detkit.data.dataset import DatasetError
from detkit.data.loading import build_checked_dataset, training_loader
from detkit.data.transforms import build_transform
from detkit.devices import autocast, resolve_device
from detkit.distributed import DistInfo, barrier, init_from_env, shutdown
from detkit.evaluation.runner import evaluate
from detkit.models.assembly import build_detector
from detkit.proposals.attach import attach_proposals
from detkit.state_dict import WeightsError
from detkit.training.loop import FiniteGuard, PeriodicCheckpoint, TrainingLog, train_loop

log = logging.getLogger(__name__)

#: a staged schedule's ``init(model)``: loads earlier stages' weights, freezes parts, returns the modules kept fixed
StageInit = Callable[[nn.Module], Iterable[nn.Module] | None]


class Trainer:
    """SGD on the detector ``cfg.model`` describes, trained on ``data.train``, in ``train.work_dir``.

    Runs as one process, or as one of N under ``torchrun`` (DistributedDataParallel; logging, checkpoints
    and the metric on rank 0). Building it sets up the process (device, process group, seeds), the dataset
    (whose classes become ``model.num_classes`` and ``model.class_names``), the model, the optimizer and the
    gradient scaler; :meth:`train` resumes, runs the loop and saves ``final.pth``.

    A staged schedule passes ``init(model)`` (load earlier stages' weights, freeze what a step keeps fixed;
    called before the optimizer is built; it returns the modules to keep in eval mode, or None), ``loss_prefixes`` (train only the losses of some stages, e.g.
    ``("rpn/",)``) and ``proposals`` (a proposal source ``get(index)`` for the training set).
    """

    def __init__(self, cfg: Config, registries, *, progress: bool = True,
                 init: StageInit | None = None, loss_prefixes: tuple[str, ...] | None = None,
                 proposals=None):
        self.cfg, self.registries, self.progress = cfg, registries, progress
        self.loss_prefixes = loss_prefixes
        self.device, self.info = self._start_process()
        self.dataset = self._build_dataset()
        self.model = self._build_model(init, proposals)
        self.optimizer, self.scaler, self.base_lr = self._build_optimizer()
        self.ddp: nn.Module = self.model  # the DistributedDataParallel wrapper under torchrun
        self.start_iter, self.position = 0, 0  # iteration and stream position (samples consumed) resumed at
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._batches = None  # this process's batches of the training stream
        self.lr = 0.0  # the learning rate of the last step
        self.log_path = os.path.join(cfg.train.work_dir, "log.jsonl")
        self.guard = FiniteGuard(self)  # stops at a non-finite loss; checks the weights before each checkpoint
        self.last_checkpoint: str | None = None  # the newest checkpoint of this run (written or resumed from)
        self.unreadable: dict[str, dict] = {}  # training images skipped as unreadable, by file

    # -------------------------------------------------------------------------------------------- build

    def _start_process(self) -> tuple[torch.device, DistInfo]:
        tcfg = self.cfg.train
        device = resolve_device(tcfg.device)
        info = init_from_env(device)
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if info.is_main:
            os.makedirs(tcfg.work_dir, exist_ok=True)
            for path in remove_stale_temporaries(tcfg.work_dir):
                log.info("removed %s, left by a checkpoint write that was interrupted", path)
        seed_everything(tcfg.seed + info.rank)
        return device, info

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
        return dataset

    def _build_model(self, init, proposals) -> nn.Module:
        cfg, tcfg = self.cfg, self.cfg.train
        names = adopt_class_names(cfg, self.dataset)
        resolve_frozen_bn(cfg)
        try:
            model = build_detector(cfg.model, self.registries, len(names), names).to(self.device)
        except WeightsError as exc:
            raise ConfigError(f"model.backbone.weights: {exc}") from None
        self.fixed: tuple[nn.Module, ...] = tuple(init(model) or ()) if init is not None else ()
        if proposals is not None:
            self.dataset.proposals = proposals
        else:
            attach_proposals(self.dataset, model, self.progress, self.info)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
            model.channels_last = True
        if tcfg.compile:
            model.trunk.compile()  # in place: parameter names (and so checkpoints) are unchanged
        return model

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler, float]:
        tcfg = self.cfg.train
        base_lr = tcfg.lr * (self.info.world_size if tcfg.scale_lr else 1)
        optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=base_lr,
                                    momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=tcfg.amp == "fp16")
        return optimizer, scaler, base_lr

    # -------------------------------------------------------------------------------------------- run

    def train(self, resume: str | bool | None = None) -> dict:
        """Resume (``True``: from the newest checkpoint in ``train.work_dir``; a path: from it), train to
        ``train.max_iters`` and evaluate; returns ``{"checkpoint", "metrics", "model"}``."""
        tcfg = self.cfg.train
        self.resume(resume)
        self._wrap_distributed()
        self._prepare_work_dir()
        loader = training_loader(self.dataset, self.cfg.data, tcfg.seed, self.position, self.info.rank,
                                 self.info.world_size, pin_memory=self.device.type == "cuda", skip_unreadable=True)
        self.scheduler = self._build_scheduler()
        self._set_train_mode()
        self._batches = iter(loader)
        train_loop(self.step, self.start_iter, tcfg.max_iters, [self.guard, TrainingLog(self, self.log_path),
                                                                PeriodicCheckpoint(self)])
        return self.finish()

    def resume(self, resume: str | bool | None) -> None:
        """Load weights, optimizer and scaler state, the iteration, the stream position and (with as many
        processes as before) the RNG state of a checkpoint."""
        if not resume:
            return
        path, ckpt = self._checkpoint_to_resume(resume)
        self.model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            # Without it an fp16 run would restart from the initial scale and skip (or take) other steps.
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_iter = ckpt["iteration"]
        self.position = ckpt.get("samples_seen", self.start_iter * self.cfg.data.batch_size)
        if ckpt.get("world_size", 1) == self.info.world_size:
            _set_rng_state(ckpt.get("rng"))
        self.last_checkpoint = path
        log.info("resumed from %s at iteration %d (%d samples seen)", path, self.start_iter, self.position)

    def _checkpoint_to_resume(self, resume: str | bool) -> tuple[str, dict]:
        """The checkpoint ``resume`` names, or (``True``) the newest in ``train.work_dir`` whose weights are
        finite: one holding NaN or infinite weights (written by an older detkit) is skipped, with a warning."""
        if resume is not True:
            return resume, load_checkpoint(resume, map_location=self.device)
        work_dir = self.cfg.train.work_dir
        candidates = run_checkpoints(work_dir)
        if not candidates:
            raise FileNotFoundError(f"--resume: no checkpoint in {work_dir}")
        for path in candidates:
            try:
                return path, load_checkpoint(path, map_location=self.device)
            except NonFiniteCheckpointError as exc:
                log.warning("--resume skips %s", exc)
        raise CheckpointError(f"--resume: every checkpoint in {work_dir} holds non-finite weights "
                              f"({', '.join(os.path.basename(p) for p in candidates)}); train afresh with "
                              f"--overwrite or into another train.work_dir")

    def _wrap_distributed(self) -> None:
        if not self.info.enabled:
            return
        if self.cfg.train.sync_bn and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def _prepare_work_dir(self) -> None:
        """The resolved config, and a log without the lines written after the checkpoint resumed from."""
        if not self.info.is_main:
            return
        with open(os.path.join(self.cfg.train.work_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump(self.cfg))
        if self.start_iter:
            _truncate_log(self.log_path, self.start_iter)
        elif os.path.exists(self.log_path):
            os.remove(self.log_path)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        tcfg = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * lr_factor(self.start_iter, tcfg)
            group["initial_lr"] = self.base_lr
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, tcfg),
                                                 last_epoch=self.start_iter - 1)

    def _set_train_mode(self) -> None:
        self.ddp.train()
        for module in self.fixed:
            # Parts a staged schedule keeps fixed run as at test time (batch-norm statistics unchanged).
            module.eval()

    def step(self) -> dict[str, Tensor]:
        """One SGD step on the next batch; returns its loss dict (``loss_prefixes`` applied)."""
        tcfg = self.cfg.train
        images, targets, proposals = self._to_device(next(self._batches))
        with autocast(self.device, tcfg.amp):
            losses = self.ddp(images, targets, proposals)
        if self.loss_prefixes is not None:
            losses = {k: v for k, v in losses.items() if k.startswith(self.loss_prefixes)}
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if tcfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return losses

    def _to_device(self, batch) -> tuple[list[Tensor], list[dict], list[Tensor] | None]:
        images, targets, proposals = batch
        self._count_unreadable(targets)
        device = self.device
        images = [img.to(device, non_blocking=True) for img in images]
        if proposals is not None:
            proposals = [p.to(device, non_blocking=True) for p in proposals]
        targets = [{"boxes": t["boxes"].to(device, non_blocking=True),
                    "labels": t["labels"].to(device, non_blocking=True),
                    "sample_seed": t["sample_seed"]} for t in targets]
        return images, targets, proposals

    def _count_unreadable(self, targets: list[dict]) -> None:
        """Report each training image skipped as unreadable (once), and stop past ``train.max_bad_images``."""
        for record in (r for t in targets for r in t.get("unreadable", ())):
            if record["file_name"] not in self.unreadable:
                self.unreadable[record["file_name"]] = record
                log.warning("skipped an unreadable training image (the next one takes its place): %s",
                            record["error"])
        limit = self.cfg.train.max_bad_images
        if len(self.unreadable) > limit:
            records = list(self.unreadable.values())
            listed = "; ".join(f"image id {r['image_id']}: {r['file_name']}" for r in records[:5])
            raise DatasetError(f"data.train: {len(records)} training images could not be read, more than "
                               f"train.max_bad_images={limit} allows ({listed}{'; ...' if len(records) > 5 else ''});"
                               f" repair or remove them, or raise train.max_bad_images")

    # -------------------------------------------------------------------------------------------- results

    def save_checkpoint(self, path: str, iteration: int) -> None:
        global_batch = self.cfg.data.batch_size * self.info.world_size
        save_checkpoint(path, model_state=self.model.state_dict(), config=to_dict(self.cfg), iteration=iteration,
                        class_names=self.cfg.model.class_names, cat_ids=list(self.dataset.cat_ids),
                        optimizer_state=self.optimizer.state_dict(), rng_state=_rng_state(),
                        samples_seen=self.position + (iteration - self.start_iter) * global_batch,
                        world_size=self.info.world_size, scaler_state=self.scaler.state_dict())
        self.last_checkpoint = path

    def finish(self) -> dict:
        """``final.pth`` and the training curves (rank 0), then the evaluation; ends the process group."""
        work_dir = self.cfg.train.work_dir
        final = os.path.join(work_dir, "final.pth")
        self.guard.check(self.cfg.train.max_iters, weights=True)
        if self.unreadable:
            log.warning("skipped %d unreadable training images (train.max_bad_images=%d): %s", len(self.unreadable),
                        self.cfg.train.max_bad_images, ", ".join(f"image id {r['image_id']} ({r['file_name']})"
                                                                 for r in self.unreadable.values()))
        if self.info.is_main:
            self.save_checkpoint(final, self.cfg.train.max_iters)
            log.info("saved %s", final)
            from detkit.reports import plot_training_curves

            plot_training_curves(self.log_path, os.path.join(work_dir, "training_curves.png"))
        barrier(self.info)
        metrics = self.evaluate()
        shutdown(self.info)
        return {"checkpoint": final, "metrics": metrics, "model": self.model}

    def evaluate(self) -> dict | None:
        """The metrics on ``data.test`` when ``train.eval_at_end`` (rank 0; None elsewhere or without)."""
        if not (self.cfg.train.eval_at_end and self.cfg.data.test):
            return None
        self.model.eval()
        return evaluate(self.model, self.cfg, self.registries, device=self.device, out_dir=self.cfg.train.work_dir,
                        dist_info=self.info, progress=self.progress)


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


def lr_factor(iteration: int, cfg) -> float:
    """Linear warmup from ``warmup_factor`` then x``gamma`` at each of ``steps``."""
    factor = cfg.gamma ** sum(1 for s in cfg.steps if iteration >= s)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_checkpoints(work_dir: str) -> list[str]:
    """The checkpoints of the run in ``work_dir``, newest first: ``final.pth``, then ``iter_*.pth`` from the
    highest iteration down."""
    if not os.path.isdir(work_dir):
        return []
    iters = sorted((int(m.group(1)), n) for n in os.listdir(work_dir) if (m := re.fullmatch(r"iter_(\d+)\.pth", n)))
    names = (["final.pth"] if os.path.isfile(os.path.join(work_dir, "final.pth")) else []) + [n for _, n in iters[::-1]]
    return [os.path.join(work_dir, n) for n in names]


def find_last_checkpoint(work_dir: str) -> str | None:
    """``final.pth`` in ``work_dir``, else its ``iter_*.pth`` of the highest iteration, else None."""
    return next(iter(run_checkpoints(work_dir)), None)


def _truncate_log(path: str, last_iter: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("iter", 0) <= last_iter]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
