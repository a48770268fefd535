"""Validation while a detector trains (``train.eval_period``) and the best checkpoint (``best.pth``).

Every ``train.eval_period`` iterations before the last, the model is scored on ``data.val`` (else
``data.test``) exactly as ``detkit eval`` scores it (the same predictions, tiling, detection cap and metric,
without the report's pictures): each process predicts its shard, rank 0 scores. The numbers go to
``log.jsonl`` as ``val/<metric>`` beside that iteration's losses, and when ``train.best_metric`` is higher
than at any validation before, the weights are written (atomically, a resumable checkpoint) to ``best.pth``.
The end-of-run evaluation takes part too. The best so far is saved in every checkpoint, so a resumed run
keeps comparing with it. (Detectron2's ``EvalHook`` and ``BestCheckpointer``, MMDetection's
``save_best``.)
"""
from __future__ import annotations

import logging
import math
import os

from torch import Tensor

from detkit.config import Config, ConfigError
from detkit.data.loading import build_dataset
from detkit.evaluation.coco_eval import stat_names
from detkit.evaluation.runner import predict_results, score_results
from detkit.training.loop import Hook

log = logging.getLogger(__name__)

BEST = "best.pth"


def metric_names(cfg: Config) -> tuple[str, ...]:
    """The metrics ``train.best_metric`` may name under ``eval.metric``."""
    return ("mAP",) if cfg.eval.metric in ("voc07", "voc") else stat_names(cfg.eval.max_detections)


def check_validation_settings(cfg: Config) -> None:
    """ConfigError for an ``eval_period`` without a set to validate on, or a ``best_metric`` the metric lacks."""
    if not cfg.train.eval_period:
        return
    if not (cfg.data.val or cfg.data.test):
        raise ConfigError(f"train.eval_period={cfg.train.eval_period}: validation needs data.val or data.test")
    names = metric_names(cfg)
    if cfg.train.best_metric not in names:
        raise ConfigError(f"train.best_metric={cfg.train.best_metric!r}: eval.metric={cfg.eval.metric} gives "
                          f"{', '.join(names)}")


def report_pictures(dataset, results: list[dict], class_names: list[str]) -> dict:
    """The evaluation report's pictures of ``results`` (drawn into a temporary folder, then read): ``{"val/<name>":
    (H, W, 3) uint8}``."""
    import tempfile

    from detkit.data.images import read_image
    from detkit.evaluation.reports import evaluation_report

    with tempfile.TemporaryDirectory(prefix="detkit-val-") as folder:
        evaluation_report(dataset, dataset.to_coco(), results, folder, class_names)
        return {f"val/{os.path.splitext(name)[0]}": read_image(os.path.join(folder, name))
                for name in sorted(os.listdir(folder)) if name.endswith(".png")}


class BestCheckpoint:
    """``best.pth``: the weights of the best validation so far by ``metric`` (higher is better), written by rank 0
    as a resumable checkpoint; :meth:`state` is what every checkpoint keeps of it, :meth:`restore` takes it back
    on resume. Detection validation and classification pretraining (top-1) both keep one."""

    def __init__(self, trainer, metric: str):
        self.trainer = trainer
        self.metric = metric
        self.best: dict | None = None  # {"metric", "value", "iteration"}

    def consider(self, done: int, metrics: dict | None) -> bool:
        """Write ``best.pth`` (rank 0) when ``metrics[metric]`` beats the best so far; whether it did."""
        trainer, value = self.trainer, (metrics or {}).get(self.metric)
        if not trainer.info.is_main or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return False  # -1: undefined (no ground truth of a size)
        if self.best is not None and value <= self.best["value"]:
            return False
        self.best = {"metric": self.metric, "value": float(value), "iteration": int(done)}
        path = os.path.join(trainer.cfg.train.work_dir, BEST)
        trainer.save_checkpoint(path, done)
        log.info("saved %s (%s %.4f at iteration %d)", path, self.metric, value, done)
        return True

    def state(self) -> dict:
        return {"best": dict(self.best)} if self.best else {}

    def restore(self, ckpt: dict) -> None:
        best = ckpt.get("best")
        if isinstance(best, dict) and best.get("metric") == self.metric:
            self.best = {"metric": best["metric"], "value": float(best["value"]), "iteration": int(best["iteration"])}


class Validator:
    """Scores a detection trainer's model on the validation set; keeps ``best.pth`` by ``train.best_metric``."""

    def __init__(self, trainer, best_metric: str):
        self.trainer = trainer
        self.dataset = None
        self.best = BestCheckpoint(trainer, best_metric)

    def validation_set(self):
        if self.dataset is None:
            cfg = self.trainer.cfg
            key = "val" if cfg.data.val else "test"
            self.dataset = build_dataset(cfg.data.val or cfg.data.test, self.trainer.registries, key)
        return self.dataset

    def validate(self, done: int) -> dict | None:
        """The metrics at iteration ``done`` (rank 0; None elsewhere), logged, and ``best.pth`` when they are
        the best so far; the model goes back to training mode."""
        trainer, cfg = self.trainer, self.trainer.cfg
        dataset = self.validation_set()
        trainer.model.eval()
        results = predict_results(trainer.model, cfg, trainer.registries, trainer.device, dataset, progress=False,
                                  dist_info=trainer.info)
        trainer._set_train_mode()
        if results is None:
            return None
        metrics = score_results(dataset.to_coco(), results, cfg.eval.metric, cfg.eval.backend,
                                list(dataset.class_names), cfg.eval.max_detections)
        trainer.logger.log_scalars(done, {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                                          and not isinstance(v, bool) and k != "max_detections"})
        if trainer.logger.takes_images:  # TensorBoard's images: this validation's PR curves, errors, galleries
            trainer.logger.log_images(done, report_pictures(dataset, results, list(dataset.class_names)))
        name = cfg.train.best_metric
        log.info("iteration %d: validation %s %.4f (%d images)", done, name, metrics.get(name, float("nan")),
                 len(dataset))
        self.best.consider(done, metrics)
        return metrics


class PeriodicValidation(Hook):
    """:meth:`Validator.validate` every ``train.eval_period`` iterations before the last (the end-of-run
    evaluation is the last), on every rank, before a checkpoint of the same iteration."""

    def __init__(self, validator: Validator):
        self.validator = validator

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        cfg = self.validator.trainer.cfg
        if done % cfg.train.eval_period == 0 and done < cfg.train.max_iters:
            self.validator.validate(done)
