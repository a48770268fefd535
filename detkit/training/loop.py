"""The training loop and the hooks that hang on it (Detectron2's ``SimpleTrainer`` shape).

The loop only counts iterations and calls ``step()``; logging, the progress bar and periodic checkpoints
are hooks, called after every step with the iteration just completed and its loss dict.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from detkit.distributed import mean_over_ranks


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


class TrainingLog(Hook):
    """On logging iterations (every ``train.log_period``, the first and the last): the losses of the global
    batch (the mean over the ranks, as one process with that batch would log them), their total and the
    learning rate, to ``log.jsonl`` (rank 0) and the progress bar; a non-finite total stops training.

    Host reads (which sync the GPU) happen only on logging iterations.
    """

    def __init__(self, trainer, path: str):
        self.trainer = trainer
        self.path = path
        self.file = self.bar = None
        self.t0 = 0.0

    def before_train(self) -> None:
        trainer = self.trainer
        if trainer.progress and trainer.info.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.cfg.train.max_iters, initial=trainer.start_iter, desc="train",
                            dynamic_ncols=True, mininterval=1.0)
        self.t0 = time.time()
        if trainer.info.is_main:
            self.file = open(self.path, "a", encoding="utf-8")

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        tcfg = self.trainer.cfg.train
        if done % tcfg.log_period == 0 or done == tcfg.max_iters or done == self.trainer.start_iter + 1:
            self._log(done, losses, self.trainer.lr)
        if self.bar is not None:
            self.bar.update(1)

    def _log(self, done: int, losses: dict[str, Tensor], lr: float) -> None:
        means = mean_over_ranks(torch.stack([v.detach().float() for v in losses.values()]), self.trainer.info)
        values = dict(zip(losses, means.tolist()))
        values["total"] = sum(values.values())
        if not math.isfinite(values["total"]):
            raise FloatingPointError(f"iteration {done}: loss is {values} (lower train.lr or set "
                                     f"train.clip_grad_norm)")
        if self.file is not None:
            record = {"iter": done, "lr": lr, **values, "time": round(time.time() - self.t0, 3)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1] if "/" in k else k: f"{v:.3f}" for k, v in values.items()}
                                 | {"lr": f"{lr:.2g}"})

    def after_train(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()


class PeriodicCheckpoint(Hook):
    """``iter_NNNNNNN.pth`` every ``train.checkpoint_period`` iterations (rank 0; the last one is
    ``final.pth``, written by the trainer)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        trainer, tcfg = self.trainer, self.trainer.cfg.train
        if (trainer.info.is_main and tcfg.checkpoint_period and done % tcfg.checkpoint_period == 0
                and done < tcfg.max_iters):
            trainer.save_checkpoint(os.path.join(tcfg.work_dir, f"iter_{done:07d}.pth"), done)
