"""What every SGD run shares, whatever it trains: the :class:`SGDTrainer`.

A detector (:class:`detkit.training.trainer.Trainer`) and a classifier
(:class:`detkit.classification.trainer.ClassifierTrainer`) differ in their dataset, their model, what one
step computes and what they write at the end; they share everything else here: the process set-up (device,
``torchrun``, seeds), SGD with momentum and weight decay and its learning-rate schedule (:func:`lr_factor`:
warmup, then steps or a cosine), the fp16 gradient scaler, exact resuming (weights, optimizer, scaler,
iteration, stream position and RNG state), DistributedDataParallel, the loop with its hooks (non-finite
guard, log, periodic checkpoints), atomic checkpoints and ``final.pth``.

A subclass implements ``_build_dataset``, ``_build_model``, ``_loader`` (this process's batches of the
training stream from ``self.position`` on) and ``step`` (one batch: forward, then :meth:`SGDTrainer.optimize`
with its loss dict), and may override ``log_metrics``, ``extra_hooks``, ``checkpoint_meta``,
``write_outputs`` and ``evaluate``.
"""
from __future__ import annotations

import copy

import json
import logging
import math
import os
import random
import re
import time

import numpy as np
import torch
from torch import Tensor, nn

from detkit.config import ConfigError, PartConfig, dump, to_dict
from detkit.data.dataset import DatasetError
from detkit.engine.checkpoint import (CheckpointError, NonFiniteCheckpointError, load_checkpoint,
                                      remove_stale_temporaries, save_checkpoint)
from detkit.engine.devices import resolve_device
from detkit.engine.distributed import DistInfo, barrier, init_from_env, shutdown
from detkit.engine.files import write_text_atomic
from detkit.registry.binding import bind_loggers, call_builder, plugin_errors
from detkit.registry.contexts import LoggerContext
from detkit.training.loggers import Loggers
from detkit.training.loop import FiniteGuard, Hook, PeriodicCheckpoint, StopOnSignal, TrainingLog, train_loop

log = logging.getLogger(__name__)

LR_POLICIES = ("step", "cosine")


class SGDTrainer:
    """One run of SGD on ``train.work_dir``: building it sets up the process, the dataset, the model, the
    optimizer and the gradient scaler; :meth:`train` resumes, runs the loop and finishes (``final.pth``, the
    training curves, the subclass's outputs, the evaluation)."""

    task = "detection"  # what the checkpoints hold: --resume refuses a checkpoint of another task

    def __init__(self, cfg, registries, *, progress: bool = True):
        # The run's own config: what the run derives (the training set's classes, the batch-norm mode) goes
        # into this copy, which its checkpoints store; the caller's config is read, never changed.
        self.cfg, self.registries, self.progress = copy.deepcopy(cfg), registries, progress
        check_train_settings(cfg.train)
        self.fixed: tuple[nn.Module, ...] = ()  # modules kept in eval mode while training (set by _build_model)
        self.device, self.info = self._start_process()
        self.dataset = self._build_dataset()
        self.model = self._build_model()
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
        self.logger = Loggers([])  # train.loggers, built by the main process when the run starts
        self.data_time = 0.0  # seconds spent waiting for batches since the last logging iteration

    # -------------------------------------------------------------------------------------------- the subclass's

    def _build_dataset(self):
        raise NotImplementedError

    def _build_model(self) -> nn.Module:
        raise NotImplementedError

    def _loader(self):
        """This process's batches of the training stream from ``self.position`` on (an iterable)."""
        raise NotImplementedError

    def step(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def log_metrics(self) -> dict[str, Tensor]:
        """Scalars (device tensors, the mean over the ranks) logged beside the losses on logging iterations;
        the subclass resets whatever it accumulates since the last log."""
        return {}

    def extra_hooks(self) -> list[Hook]:
        """Hooks after the log and before the periodic checkpoint (validation, ...)."""
        return []

    def restore_meta(self, ckpt: dict) -> None:
        """Take back what :meth:`checkpoint_meta` added to a checkpoint being resumed (nothing by default)."""

    def checkpoint_meta(self) -> dict:
        """``class_names``, ``cat_ids`` and ``extra`` (saved as top-level keys) of :func:`save_checkpoint`."""
        raise NotImplementedError

    def write_outputs(self) -> None:
        """Files the run writes after ``final.pth`` (rank 0)."""

    def evaluate(self) -> dict | None:
        return None

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
        self.start(resume)
        try:
            try:
                train_loop(self.step, self.start_iter, self.cfg.train.max_iters, self.hooks())
            finally:
                self.close_stream()
            return self.finish()
        finally:
            self.logger.close()

    def hooks(self) -> list[Hook]:
        """The loop's hooks, in order: the non-finite guard (first: it stops before anything logs or saves), the
        log, the subclass's, the periodic checkpoint, the stop on SIGINT/SIGTERM (last: it writes its checkpoint
        after the step's own)."""
        return [self.guard, TrainingLog(self), *self.extra_hooks(), PeriodicCheckpoint(self),
                StopOnSignal(self)]

    def start(self, resume: str | bool | None = None) -> None:
        """Everything :meth:`train` does before its first step: resume, DDP, the work directory, the learning
        rate schedule, training mode and the batches."""
        self.resume(resume)
        self._wrap_distributed()
        self._prepare_work_dir()
        self.logger = self._build_loggers()
        self.scheduler = self._build_scheduler()
        self._set_train_mode()
        self.open_stream()

    def _build_loggers(self) -> Loggers:
        """``train.loggers`` (rank 0), with every logger registered ``always=True`` the list lacks (``jsonl``: the
        curves, ``detkit compare`` and resume read ``log.jsonl``), each told the config."""
        if not self.info.is_main:
            return Loggers([])
        tcfg = self.cfg.train
        named = {part.name for part in tcfg.loggers}
        always = [PartConfig(e.name) for e in self.registries.loggers.entries() if e.info.get("always")]
        tcfg.loggers = [*(p for p in always if p.name not in named), *tcfg.loggers]
        bind_loggers(tcfg, self.registries)
        kind = self.registries.part_kind("logger")
        context = LoggerContext(work_dir=tcfg.work_dir, start_iter=int(self.start_iter), max_iters=int(tcfg.max_iters))
        loggers = Loggers([])
        try:
            for i, part in enumerate(tcfg.loggers):
                entry = self.registries.loggers.get(part.name)
                with plugin_errors(self.registries, entry, f"train.loggers[{i}]: logger {part.name!r}"):
                    loggers.loggers.append(call_builder(kind, entry, part.settings, context))
            loggers.log_config(to_dict(self.cfg))
        except BaseException:
            loggers.close()
            raise
        return loggers

    def _log_report_pictures(self) -> None:
        """The end-of-run report's pictures, to the loggers at the last iteration (rank 0)."""
        if not self.info.is_main or not self.logger.loggers:
            return
        from detkit.data.images import ImageReadError, read_image

        pictures = {}
        for name in REPORT_PICTURES:
            path = os.path.join(self.cfg.train.work_dir, name)
            if os.path.isfile(path):
                try:
                    pictures[f"report/{os.path.splitext(name)[0]}"] = read_image(path)
                except ImageReadError as exc:
                    log.warning("not logged: %s", exc)
        self.logger.log_images(self.cfg.train.max_iters, pictures)

    def next_batch(self):
        """The next batch of the training stream; the wait is counted in :attr:`data_time`."""
        start = time.perf_counter()
        batch = next(self._batches)
        self.data_time += time.perf_counter() - start
        return batch

    def open_stream(self) -> None:
        """This process's batches of the training stream from ``self.position`` on, through a new loader (new
        workers; the loader draws from its own generator, not the RNG state a resume restored)."""
        self._batches = iter(self._loader())

    def close_stream(self) -> None:
        """Drop the last reference to the loader's iterator: its workers end now, not when the garbage collector
        reaches the trainer's reference cycles (the hooks hold the trainer), which waits 5 s per worker."""
        self._batches = None

    def resume(self, resume: str | bool | None) -> None:
        """Load weights, optimizer and scaler state, the iteration, the stream position and (with as many
        processes as before) the RNG state of a checkpoint."""
        if not resume:
            return
        path, ckpt = self._checkpoint_to_resume(resume)
        self.check_resumable(path, ckpt)
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
        self.restore_meta(ckpt)
        log.info("resumed from %s at iteration %d (%d samples seen)", path, self.start_iter, self.position)

    def check_resumable(self, path: str, ckpt: dict) -> None:
        """Refuse a checkpoint trained as another model, before its weights are loaded: other class names (of
        the same number, its weights would load and be labelled with the wrong names), or weights that do not
        fit this config's model (another backbone, class count or head), naming the config keys that differ.
        Other differences of the model config (test-time settings) are logged and the run goes on."""
        mine, theirs = self.checkpoint_meta().get("class_names"), ckpt.get("class_names")
        if mine is not None and theirs is not None and list(mine) != list(theirs):
            changed = [f"{k + 1}: {a!r} there, {b!r} here" for k, (a, b) in enumerate(zip(theirs, mine)) if a != b]
            detail = "; ".join(changed[:4]) if len(mine) == len(theirs) else f"{len(theirs)} there, {len(mine)} here"
            raise ConfigError(f"--resume {path}: the checkpoint was trained on other classes ({detail}); resuming "
                              f"would carry its weights over to these names. Resume with the data it was trained "
                              f"on, or start a new run (another train.work_dir, or --overwrite)")
        stored = (ckpt.get("config") or {}).get("model")
        differing = _differences(stored, to_dict(self.cfg).get("model"), "model") if isinstance(stored, dict) else []
        differing = [d for d in differing if not d.startswith(("model.backbone.weights", "model.class_names"))]
        state, weights = self.model.state_dict(), ckpt["model"]
        unfit = sorted(set(state) ^ set(weights)) or [k for k in state if tuple(state[k].shape) !=
                                                       tuple(weights[k].shape)]
        if unfit:
            said = "; ".join(differing[:5]) or "no config key differs"
            raise ConfigError(f"--resume {path}: its weights do not fit this config's model ({unfit[0]}"
                              f"{' and others' if len(unfit) > 1 else ''}); the model config differs: {said}. "
                              f"Resume with the config it was trained with (config.yaml beside it)")
        if differing:
            log.warning("--resume %s: the model config differs from the checkpoint's: %s", path,
                        "; ".join(differing[:5]))

    def _checkpoint_to_resume(self, resume: str | bool) -> tuple[str, dict]:
        """The checkpoint ``resume`` names, or (``True``) the newest in ``train.work_dir`` whose weights are
        finite: one holding NaN or infinite weights (written by an older detkit) is skipped, with a warning."""
        if resume is not True:
            return resume, load_checkpoint(resume, map_location=self.device, task=self.task)
        work_dir = self.cfg.train.work_dir
        candidates = run_checkpoints(work_dir)
        if not candidates:
            raise FileNotFoundError(f"--resume: no checkpoint in {work_dir}")
        for path in candidates:
            try:
                return path, load_checkpoint(path, map_location=self.device, task=self.task)
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
        write_text_atomic(os.path.join(self.cfg.train.work_dir, "config.yaml"), dump(self.cfg))
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

    def optimize(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """The SGD step on the sum of ``losses`` (fp16 scaling, ``train.clip_grad_norm``, the learning rate
        schedule); returns ``losses``."""
        tcfg = self.cfg.train
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

    def count_unreadable(self, records) -> None:
        """Report each training image skipped as unreadable (``{"image_id", "file_name", "error"}`` records,
        once each), and stop past ``train.max_bad_images``."""
        for record in records:
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
                        optimizer_state=self.optimizer.state_dict(), rng_state=_rng_state(),
                        samples_seen=self.position + (iteration - self.start_iter) * global_batch,
                        world_size=self.info.world_size, scaler_state=self.scaler.state_dict(),
                        **self.checkpoint_meta())
        self.last_checkpoint = path
        if self.cfg.train.keep_checkpoints and PERIODIC.fullmatch(os.path.basename(path)):
            periodic = [p for p in run_checkpoints(os.path.dirname(path)) if PERIODIC.fullmatch(os.path.basename(p))]
            for old in periodic[self.cfg.train.keep_checkpoints:]:  # newest first
                os.remove(old)
                log.info("removed %s (train.keep_checkpoints=%d)", old, self.cfg.train.keep_checkpoints)

    def finish(self) -> dict:
        """``final.pth``, the training curves and the subclass's outputs (rank 0), then the evaluation; ends
        the process group."""
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
            self.write_outputs()
            from detkit.evaluation.reports import plot_training_curves

            plot_training_curves(self.log_path, os.path.join(work_dir, "training_curves.png"))
        barrier(self.info)
        metrics = self.evaluate()
        self._log_report_pictures()
        shutdown(self.info)
        return {"checkpoint": final, "metrics": metrics, "model": self.model}


#: the pictures of an end-of-run report that go to the loggers (TensorBoard's images), where the run wrote them
REPORT_PICTURES = ("training_curves.png", "pr_curves.png", "errors.png", "gallery_worst.png", "gallery_best.png",
                   "confusion_matrix.png")


# ----------------------------------------------------------------------------- helpers


def check_train_settings(tcfg) -> None:
    """The ``train:`` keys whose values are names, checked before anything is built."""
    if tcfg.lr_policy not in LR_POLICIES:
        raise ConfigError(f"train.lr_policy={tcfg.lr_policy!r}: expected one of {', '.join(LR_POLICIES)}")
    if tcfg.amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"train.amp={tcfg.amp!r}: expected none, bf16 or fp16")


def lr_factor(iteration: int, cfg) -> float:
    """Linear warmup from ``warmup_factor``, then (``lr_policy``) x``gamma`` at each of ``steps``, or half a
    cosine from 1 at the end of the warmup to 0 at ``max_iters`` (SGDR without restarts)."""
    if cfg.lr_policy == "cosine":
        span = max(cfg.max_iters - cfg.warmup_iters, 1)
        factor = 0.5 * (1 + math.cos(math.pi * min(max(iteration - cfg.warmup_iters, 0) / span, 1.0)))
    else:  # "step" (check_train_settings refuses other names before a run starts)
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


#: the name of a periodic checkpoint (``iter_0005000.pth``)
PERIODIC = re.compile(r"iter_(\d+)\.pth")


def run_checkpoints(work_dir: str) -> list[str]:
    """The checkpoints of the run in ``work_dir``, newest first: ``final.pth``, then ``iter_*.pth`` from the
    highest iteration down."""
    if not os.path.isdir(work_dir):
        return []
    iters = sorted((int(m.group(1)), n) for n in os.listdir(work_dir) if (m := PERIODIC.fullmatch(n)))
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


def _differences(there, here, path: str) -> list[str]:
    """``path.key: <there> there, <here> here`` for each value two nested config mappings hold differently."""
    if isinstance(there, dict) and isinstance(here, dict):
        return [d for key in sorted(set(there) | set(here), key=str)
                for d in _differences(there.get(key), here.get(key), f"{path}.{key}")]
    return [] if there == here else [f"{path}={there!r} there, {here!r} here"]
