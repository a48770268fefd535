"""The training loop and the hooks that hang on it (Detectron2's ``SimpleTrainer`` shape).

The loop only counts iterations and calls ``step()``; the check for non-finite losses, logging, the
progress bar and periodic checkpoints are hooks, called after every step with the iteration just completed
and its loss dict.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from detkit.engine.checkpoint import describe_tensors, nonfinite_tensors
from detkit.engine.distributed import mean_over_ranks
from detkit.engine.progress import on_terminal, progress_bar
from detkit.engine.signals import Stopped


class Hook:
    """Called around the loop: ``before_train``, ``after_step(done, losses)`` (``done``: iterations completed,
    ``losses``: the step's loss dict) and ``after_train`` (also when the loop fails)."""

    def before_train(self) -> None:
        pass

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        pass

    def after_train(self) -> None:
        pass


def train_loop(step: Callable[[], dict[str, Tensor]], start_iter: int, max_iters: int,
               hooks: Sequence[Hook] = ()) -> None:
    """Run ``step()`` for iterations ``start_iter .. max_iters - 1``, the hooks after each one."""
    try:
        for hook in hooks:
            hook.before_train()
        for iteration in range(start_iter, max_iters):
            losses = step()
            for hook in hooks:
                hook.after_step(iteration + 1, losses)
    finally:
        for hook in hooks:
            hook.after_train()


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss or weight; the message names the iteration, the losses and the last
    checkpoint written before it."""


def is_logging_iteration(done: int, trainer) -> bool:
    """Every ``train.log_period`` iterations, the first one of the run and the last."""
    tcfg = trainer.cfg.train
    return done % tcfg.log_period == 0 or done == tcfg.max_iters or done == trainer.start_iter + 1


def is_checkpoint_iteration(done: int, trainer) -> bool:
    """Every ``train.checkpoint_period`` iterations before the last (whose checkpoint is ``final.pth``)."""
    tcfg = trainer.cfg.train
    return bool(tcfg.checkpoint_period) and done % tcfg.checkpoint_period == 0 and done < tcfg.max_iters


class FiniteGuard(Hook):
    """Stops training at a non-finite loss, which every iteration is checked for without a host read: each
    step's losses fold into tensors on their device (the first iteration with a non-finite loss, and its
    losses), read on logging iterations and, with the weights, before every checkpoint (:meth:`check`; the
    trainer calls it before ``final.pth``). It must run before the hooks that log or save.

    Under ``torchrun`` every rank calls :meth:`check` on the same iterations (it reduces over the ranks).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.first_bad: Tensor | None = None  # the first iteration with a non-finite loss; 0 while there is none
        self.bad_values: Tensor | None = None  # that iteration's losses, in the order of ``self.names``
        self.names: list[str] = []

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        if not losses:
            return
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=values.device)
        if list(losses) != self.names:  # the first step (a run's loss names stay the same)
            self.names = list(losses)
            self.bad_values = torch.full_like(values, math.nan)
        first = ~torch.isfinite(values).all() & (self.first_bad == 0)
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, done), self.first_bad)
        self.bad_values = torch.where(first, values, self.bad_values)
        checkpoint = is_checkpoint_iteration(done, self.trainer)
        if checkpoint or is_logging_iteration(done, self.trainer):
            self.check(done, weights=checkpoint)

    def check(self, done: int, weights: bool = False) -> None:
        """Raise TrainingDiverged if a loss so far was non-finite or (``weights``) a weight is now."""
        info = self.trainer.info
        first = 0
        if self.first_bad is not None:
            mark = torch.where(self.first_bad > 0, self.first_bad, torch.full_like(self.first_bad, 2**62))
            if info.enabled:  # the earliest iteration any rank saw
                dist.all_reduce(mark, op=dist.ReduceOp.MIN)
            first = int(mark)  # the host read
            first = first if first < 2**62 else 0
        bad_weights = nonfinite_tensors(self.trainer.model.state_dict()) if weights and not first else []
        if first or bad_weights:
            raise TrainingDiverged(self.message(done, first, bad_weights))

    def message(self, done: int, first: int, bad_weights: list[str]) -> str:
        trainer = self.trainer
        tcfg = trainer.cfg.train
        if first:
            mine = self.first_bad is not None and int(self.first_bad) == first
            losses = dict(zip(self.names, self.bad_values.tolist())) if mine else {}
            losses["total"] = sum(losses.values()) if losses else math.nan
            shown = ", ".join(f"{k}={v:.4g}" for k, v in losses.items()) if mine else "on another process"
            what = f"the loss is not finite at iteration {first} ({shown})"
            if first != done:
                what += f", found at iteration {done}"
        else:
            total = len(trainer.model.state_dict())
            what = (f"at iteration {done} the weights hold non-finite values ({describe_tensors(bad_weights, total)})"
                    f" although the losses were finite")
        last = trainer.last_checkpoint
        saved = (f"the last good checkpoint is {last} (`--resume` continues from it)" if last else
                 f"there is no good checkpoint to resume from (train.checkpoint_period={tcfg.checkpoint_period})")
        return (f"training diverged: {what}. Nothing from then on was saved; {saved}. Lower train.lr (now "
                f"{tcfg.lr:g}), set train.clip_grad_norm or a longer train.warmup_iters, or check the data.")


class TrainingLog(Hook):
    """On logging iterations (every ``train.log_period``, the first and the last): the losses of the global
    batch (the mean over the ranks, as one process with that batch would log them), their total, the learning
    rate and how the run goes (seconds per iteration and waiting for data since the last log, the ETA, images
    per second, peak memory) to the trainer's loggers (``log.jsonl`` and ``train.loggers``; rank 0) and the
    progress bar; without one (``progress=False``, ``--no-progress``, or stderr not a terminal: a redirected log
    gets no carriage returns), one INFO line through :mod:`logging` instead: iteration, losses, lr, seconds per
    iteration and ETA (:func:`progress_line`). (The
    :class:`FiniteGuard` before it has stopped training at a non-finite loss.)

    Host reads (which sync the GPU) happen only on logging iterations.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.bar = None
        self.t0 = 0.0
        self.last = (0, 0.0)  # the iteration and the time of the last logging iteration (seconds per iteration)

    def before_train(self) -> None:
        trainer = self.trainer
        if trainer.progress and trainer.info.is_main and on_terminal():  # redirected: the plain lines instead
            self.bar = progress_bar(total=trainer.cfg.train.max_iters, initial=trainer.start_iter, desc="train")
        self.t0 = time.time()
        self.last = (trainer.start_iter, self.t0)
        trainer.data_time = 0.0

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        if is_logging_iteration(done, self.trainer):
            self._log(done, losses, self.trainer.lr)
        if self.bar is not None:
            self.bar.update(1)

    def _log(self, done: int, losses: dict[str, Tensor], lr: float) -> None:
        trainer = self.trainer
        means = mean_over_ranks(torch.stack([v.detach().float() for v in losses.values()]), trainer.info)
        values = dict(zip(losses, means.tolist()))
        values["total"] = sum(values.values())
        metrics = getattr(trainer, "log_metrics", dict)()  # not losses: beside them, outside the total
        metrics = dict(zip(metrics, torch.stack(list(metrics.values())).tolist())) if metrics else {}
        losses_only, values = values, values | metrics
        now = time.time()
        steps = max(done - self.last[0], 1)
        per_iter, data = (now - self.last[1]) / steps, trainer.data_time / steps
        self.last, trainer.data_time = (done, now), 0.0
        if trainer.info.is_main:
            pace = {"sec_per_iter": round(per_iter, 5), "data_sec": round(data, 5),
                    "eta_sec": round(per_iter * (trainer.cfg.train.max_iters - done), 1),
                    "images_per_sec": round(trainer.cfg.data.batch_size * trainer.info.world_size
                                            / max(per_iter, 1e-9), 2),
                    "peak_mem_mb": round(peak_memory_mb(trainer.device), 1)}
            trainer.logger.log_scalars(done, {"lr": lr, **values, **pace, "time": round(now - self.t0, 3)})
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"lr": f"{lr:.2g}"})
        elif trainer.info.is_main:  # --no-progress: quiet, not silent
            _log.info("%s", progress_line(done, trainer.cfg.train.max_iters, losses_only, metrics, lr, per_iter))

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_memory_mb(device: torch.device) -> float:
    """The most memory the run has held: CUDA's peak allocation on ``device``, else the process's peak resident
    set (the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def progress_line(done: int, max_iters: int, losses: dict[str, float], metrics: dict[str, float], lr: float,
                  per_iter: float) -> str:
    """The line a logging iteration gives without a progress bar: ``iter 40/1000  loss 1.234 (rpn/objectness 0.693,
    roi/cls 0.412, ...)  lr 0.001  0.52 s/it  ETA 0:08:19`` (``losses`` with their ``total``; ``metrics``, such as
    a classifier's top-1, after the losses)."""
    parts = ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if k != "total")
    extra = "".join(f"  {k} {v:.4g}" for k, v in metrics.items())
    eta = max(int(round(per_iter * (max_iters - done))), 0)
    return (f"iter {done}/{max_iters}  loss {losses['total']:.4g} ({parts}){extra}  lr {lr:.3g}  {per_iter:.3g} s/it  "
            f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


class PeriodicCheckpoint(Hook):
    """``iter_NNNNNNN.pth`` every ``train.checkpoint_period`` iterations (rank 0; the last one is
    ``final.pth``, written by the trainer), after the :class:`FiniteGuard` checked the losses and weights."""

    def __init__(self, trainer):
        self.trainer = trainer

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        trainer = self.trainer
        if trainer.info.is_main and is_checkpoint_iteration(done, trainer):
            trainer.save_checkpoint(os.path.join(trainer.cfg.train.work_dir, f"iter_{done:07d}.pth"), done)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step, and a resumable checkpoint was written; ``exit_code``
    is the shell's for the signal (130, 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopOnSignal(Hook):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop, ``kill``) lets the current step finish, then writes
    ``iter_NNNNNNN.pth`` (checked by the :class:`FiniteGuard` first) and raises :class:`TrainingInterrupted`,
    which says how to resume; a second signal stops at once. Without it the work since the last periodic
    checkpoint was lost. One process only: the ranks of a torchrun job would stop at different steps inside
    their collectives, so a job keeps the default handlers (and its periodic checkpoints)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer):
        self.trainer = trainer
        self.signum: int | None = None
        self._previous: dict = {}

    def before_train(self) -> None:
        if self.trainer.info.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: stop now, without the checkpoint
            self.after_train()
            raise Stopped(signum)
        self.signum = signum
        _log.warning("%s: finishing this step, then writing a checkpoint to resume from (send it again to stop at "
                     "once)", signal.Signals(signum).name)

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        trainer = self.trainer
        if self.signum is None or done >= trainer.cfg.train.max_iters:  # the last step: the run ends as usual
            return
        path = os.path.join(trainer.cfg.train.work_dir, f"iter_{done:07d}.pth")
        if trainer.last_checkpoint != path:  # not written by the periodic checkpoint of this very step
            trainer.guard.check(done, weights=True)
            trainer.save_checkpoint(path, done)
        raise TrainingInterrupted(f"stopped by {signal.Signals(self.signum).name} after iteration {done} of "
                                  f"{trainer.cfg.train.max_iters}: saved {path}; continue the run with --resume",
                                  128 + self.signum)

    def after_train(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


_log = logging.getLogger(__name__)
