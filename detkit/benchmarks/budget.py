"""Training under the same wall-clock budget: detkit configs and torchvision's FPN Faster R-CNNs, each given
the same number of seconds of SGD on the same data, then scored by the same COCO code (``tools/budget.py``).

Every run spends the budget alike. A calibration run (:data:`CALIBRATION_WARMUP` untimed iterations, then
:data:`CALIBRATION_ITERS` timed ones) measures seconds per iteration; the real run, from freshly seeded weights,
then trains ``max_iters = budget / that`` iterations with the learning-rate schedule scaled to them: linear
warmup over the configured iterations (at most up to the step), one step (x ``train.gamma``) at
:data:`STEP_AT` of ``max_iters``. Its training time, from the first step to the last (model building and
evaluation excluded; the device synchronised there), is measured as detkit's training log times it. So the
iteration counts are a deterministic function of the machine's speed, and everything else of the seeds.

A detkit spec is a config file trained by detkit's own schedule (:func:`detkit.training.train`, so a Trainer
run) on the given datasets, ``--set`` overrides applied. A torchvision spec (``torchvision:resnet18_fpn``,
``torchvision:resnet50_fpn``) is torchvision's ``FasterRCNN`` on ``resnet_fpn_backbone(backbone_name=...,
weights=None, trainable_layers=5, norm_layer=BatchNorm2d)`` with its own defaults (anchors, samplers, NMS), trained by a plain SGD
loop on detkit's training stream (same sampler, augmentation and batches). Its settings are a detkit config
(:data:`TORCHVISION_DEFAULTS`, the ``--set`` overrides over them), of which it reads ``data.batch_size``,
``data.num_workers``, ``data.augment``, ``data.skip_empty``, ``data.group_by_aspect_ratio``, ``train.lr``,
``momentum``, ``weight_decay``, ``warmup_iters``, ``warmup_factor``, ``gamma``, ``seed``, ``device``,
``log_period`` and ``model.transform.min_size``/``max_size`` (default: the training images' shorter and
longer sides, so images keep their size); the other keys concern detkit specs only.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detkit.benchmarks.common import markdown_table
from detkit.config import Config, ConfigError, TrainConfig, apply_overrides, from_dict, load_config, to_dict
from detkit.data.loading import build_dataset, training_loader
from detkit.data.transforms import build_transform
from detkit.engine.devices import resolve_device
from detkit.evaluation.coco_eval import detections_to_coco_results
from detkit.evaluation.runner import predict_dataset, score_results
from detkit.proposals.attach import attach_proposals
from detkit.plugins import UnknownNameError
from detkit.training import Hook, resolve_schedule, train, train_loop
from detkit.training.schedules import chosen_parts
from detkit.training.trainer import lr_factor, seed_everything

#: untimed, then timed iterations of the calibration run
CALIBRATION_WARMUP, CALIBRATION_ITERS = 2, 10
#: where the one learning-rate step falls, as a fraction of the run's iterations
STEP_AT = 0.8
#: ``torchvision:NAME`` -> torchvision's ``resnet_fpn_backbone`` name
TORCHVISION_MODELS = {"resnet18_fpn": "resnet18", "resnet50_fpn": "resnet50"}
#: a torchvision spec's settings before ``--set``: torchvision's reference recipe at batch 2 (lr 0.02,
#: weight decay 1e-4), 100 warmup iterations; image sizes are added from the training set
TORCHVISION_DEFAULTS = {
    "data": {"batch_size": 2},
    "train": {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "warmup_iters": 100},
}
#: the metrics each run reports
METRICS = ("AP", "AP50", "APs")


class SpecError(ValueError):
    """A ``NAME=SPEC`` (or dataset) that cannot run; the message names it."""


@dataclass
class Spec:
    """One row of the comparison: ``kind`` is ``"detkit"`` (``target``: a config path) or ``"torchvision"``
    (``target``: a key of :data:`TORCHVISION_MODELS`); ``cfg`` is the resolved config the run starts from."""

    name: str
    text: str
    kind: str
    target: str
    cfg: Config


def coco_dataset(path: str, flag: str) -> dict:
    """The dataset mapping of a COCO json ``path`` whose images are in ``images/`` beside it (the layout
    ``detkit data synth`` writes)."""
    images = os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    if not os.path.isfile(path):
        raise SpecError(f"{flag} {path}: no such COCO annotation file")
    if not os.path.isdir(images):
        raise SpecError(f"{flag} {path}: expected its images in {images}, which is not a directory")
    return {"name": "coco", "images": images, "annotations": path}


def image_sides(train_data: dict, test_data: dict, registries) -> tuple[int, int]:
    """The shorter and longer side of the first training image, once both datasets are checked to load and
    to have the same classes."""
    try:
        train_set = build_dataset(train_data, registries, "train")
        test_set = build_dataset(test_data, registries, "test")
    except ValueError as exc:  # ConfigError, DatasetError
        raise SpecError(str(exc)) from None
    if list(train_set.class_names) != list(test_set.class_names):
        raise SpecError(f"--test {test_data['annotations']}: classes {list(test_set.class_names)} differ from "
                        f"--train's {list(train_set.class_names)}")
    image = train_set.image_info(0)
    short, long = sorted((image["height"], image["width"]))
    return short, long


def parse_specs(texts: list[str], overrides: list[str], train_data: dict, test_data: dict, registries) -> list[Spec]:
    """Every ``NAME=SPEC`` checked and its config resolved, before anything trains."""
    sides = image_sides(train_data, test_data, registries)
    specs: list[Spec] = []
    for text in texts:
        name, sep, target = text.partition("=")
        if not sep or not name or not target or os.sep in name:
            raise SpecError(f"{text!r}: expected NAME=CONFIG.yaml or NAME=torchvision:MODEL (NAME without {os.sep})")
        if any(s.name == name for s in specs):
            raise SpecError(f"{text!r}: the name {name!r} is given twice")
        try:
            kind, target, cfg = _resolve(target, overrides, sides, registries)
        except (ConfigError, FileNotFoundError) as exc:
            raise SpecError(f"{text!r}: {exc}") from None
        cfg.data.train, cfg.data.test = copy.deepcopy(train_data), copy.deepcopy(test_data)
        specs.append(Spec(name, text, kind, target, cfg))
    return specs


def _resolve(target: str, overrides: list[str], sides: tuple[int, int], registries) -> tuple[str, str, Config]:
    if target.startswith("torchvision:"):
        model = target.removeprefix("torchvision:")
        if model not in TORCHVISION_MODELS:
            raise ConfigError(f"unknown torchvision model {model!r} (expected one of "
                              f"{', '.join(TORCHVISION_MODELS)})")
        base = copy.deepcopy(TORCHVISION_DEFAULTS)
        base["model"] = {"transform": {"min_size": sides[0], "max_size": sides[1]}}
        return "torchvision", model, from_dict(apply_overrides(base, overrides), source="--set")
    if not os.path.isfile(target):
        raise FileNotFoundError(f"{target}: no such config file")
    cfg = load_config(target, overrides, registries)
    for kind, key, name in chosen_parts(cfg.model, registries):  # exist (loading checked their sections)
        try:
            registries.kind(kind).get(name)
        except UnknownNameError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    schedule, reason = resolve_schedule(cfg, registries)
    if schedule.info.get("single_process"):
        raise ConfigError(f"{reason} trains in stages; a budget run times one run of the trainer")
    return "detkit", target, cfg


def run_config(spec: Spec, work_dir: str, max_iters: int, calibrate: bool = False) -> Config:
    """The config of one run of ``spec`` in ``work_dir``: ``max_iters`` iterations, one learning-rate step at
    :data:`STEP_AT` of them, warmup ending by the step at the latest; no evaluation or checkpoint on the way.
    ``calibrate``: every iteration timed, the configured warmup and no step (the learning rate does not
    change the speed)."""
    cfg = copy.deepcopy(spec.cfg)
    tcfg = cfg.train
    tcfg.work_dir, tcfg.eval_at_end, tcfg.checkpoint_period, tcfg.max_iters = work_dir, False, 0, max_iters
    if calibrate:
        tcfg.steps, tcfg.log_period = [], 1
    else:
        tcfg.steps = [max(1, int(STEP_AT * max_iters))]
        tcfg.warmup_iters = min(tcfg.warmup_iters, tcfg.steps[0])
    return cfg


def seconds_per_iteration(clock: dict[int, float]) -> float:
    """Of a calibration run's clock (``{iteration: seconds since the loop started}``): the mean over the
    timed iterations."""
    end = CALIBRATION_WARMUP + CALIBRATION_ITERS
    return (clock[end] - clock[CALIBRATION_WARMUP]) / CALIBRATION_ITERS


# ----------------------------------------------------------------------------- detkit specs


def train_detkit(spec: Spec, cfg: Config, registries) -> tuple[nn.Module, dict[int, float]]:
    """Train ``cfg`` (a :func:`run_config` of a detkit spec) by its schedule; returns the model and the clock
    (``{iteration: seconds since the loop started}``) read from its training log."""
    # overwrite: the calibration run of the same spec left its final.pth in this work dir.
    model = train(cfg, registries, progress=False, overwrite=True)["model"]
    with open(os.path.join(cfg.train.work_dir, "log.jsonl"), encoding="utf-8") as f:
        clock = {r["iter"]: r["time"] for r in map(json.loads, filter(str.strip, f))}
    return model, clock


# ----------------------------------------------------------------------------- torchvision specs


class FloatImages(nn.Module):
    """torchvision's detector fed detkit's batches: ``(3, H, W)`` uint8 images as float in [0, 1], targets
    cut to ``boxes``/``labels``, proposals ignored (its RPN makes its own)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: list[Tensor], targets: list[dict] | None = None, proposals=None):
        images = [img.float() / 255 if img.dtype == torch.uint8 else img for img in images]
        if targets is not None:
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        return self.detector(images, targets)


def build_torchvision(model: str, num_classes: int, cfg: Config) -> FloatImages:
    """torchvision's FasterRCNN on an untrained, fully trainable ResNet-FPN (trainable batch norm) for
    ``num_classes`` object classes."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    # Batch norm that learns, as torchvision's own fasterrcnn_resnet50_fpn builds an untrained backbone (and as
    # detkit's frozen_bn defaults to without weights): resnet_fpn_backbone's default FrozenBatchNorm2d keeps
    # the identity statistics of an untrained net, which would handicap torchvision's side.
    backbone = resnet_fpn_backbone(backbone_name=TORCHVISION_MODELS[model], weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)
    min_size = cfg.model.transform.min_size
    return FloatImages(FasterRCNN(backbone, num_classes=num_classes + 1,
                                  min_size=tuple(min_size) if isinstance(min_size, list) else min_size,
                                  max_size=cfg.model.transform.max_size))


class StepClock(Hook):
    """Seconds since the loop started after the iterations detkit's training log times (every
    ``log_period``, the first and the last), the device synchronised there; a non-finite loss there stops
    training, as in detkit's log."""

    def __init__(self, tcfg: TrainConfig):
        self.tcfg = tcfg
        self.times: dict[int, float] = {}
        self.t0 = 0.0

    def before_train(self) -> None:
        self.t0 = time.time()

    def after_step(self, done: int, losses: dict[str, Tensor]) -> None:
        if done % self.tcfg.log_period and done not in (1, self.tcfg.max_iters):
            return
        total = float(sum(v.detach().float() for v in losses.values()))  # reads back: synchronises
        if not math.isfinite(total):
            raise FloatingPointError(f"iteration {done}: loss is {total} (lower train.lr)")
        self.times[done] = round(time.time() - self.t0, 3)


def train_torchvision(spec: Spec, cfg: Config, registries) -> tuple[nn.Module, dict[int, float]]:
    """Plain SGD on ``spec``'s torchvision model as :func:`train_detkit` trains a config: the same training
    stream, optimizer and learning-rate schedule (:func:`detkit.training.trainer.lr_factor`), timed alike."""
    tcfg, data = cfg.train, cfg.data
    device = resolve_device(tcfg.device)
    seed_everything(tcfg.seed)
    transform = build_transform(True, data.augment.hflip, data.augment.scale, data.augment.crop,
                                data.augment.color_jitter)
    dataset = build_dataset(data.train, registries, "train", transform=transform, skip_empty=data.skip_empty)
    model = build_torchvision(spec.target, len(dataset.class_names), cfg).to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr,
                                momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, tcfg))
    batches = iter(training_loader(dataset, data, tcfg.seed, pin_memory=device.type == "cuda"))

    def step() -> dict[str, Tensor]:
        images, targets, _ = next(batches)
        losses = model([img.to(device, non_blocking=True) for img in images],
                       [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels")} for t in targets])
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        scheduler.step()
        return losses

    clock = StepClock(tcfg)
    train_loop(step, 0, tcfg.max_iters, [clock])
    del batches  # shut the loader's workers down
    return model, clock.times


# ----------------------------------------------------------------------------- one run, many runs


def evaluate(model: nn.Module, test_data: dict, registries, device: torch.device,
             attach: bool = False) -> dict[str, float]:
    """:data:`METRICS` of ``model`` on the test set, by detkit's COCO scoring (``attach``: a detkit model,
    whose proposal source may keep boxes per dataset, gets them attached first)."""
    dataset = build_dataset(test_data, registries, "test")
    if attach:
        attach_proposals(dataset, model, progress=False)
    results = []
    for det in predict_dataset(model, dataset, device, progress=False):
        results.extend(detections_to_coco_results(det["image_id"], det, list(dataset.cat_ids)))
    metrics = score_results(dataset.to_coco(), results, "coco", class_names=list(dataset.class_names))
    return {k: metrics[k] for k in METRICS}


#: how each kind of spec trains a run config
TRAINERS = {"detkit": train_detkit, "torchvision": train_torchvision}


def run_on_budget(spec: Spec, budget: float, registries, work_dir: str, log=print) -> dict:
    """Calibrate, train ``spec`` for as many iterations as ``budget`` seconds allow (in ``work_dir/NAME``),
    evaluate; returns the row: ``name``, ``spec``, ``kind``, ``iterations``, ``calibrated_seconds_per_iter``,
    ``train_seconds`` and ``seconds_per_iter`` (measured), :data:`METRICS`, ``settings`` (the config of the
    run, or for torchvision the settings it read); where the loss diverged (in calibration or in the run),
    what was not measured is None and ``error`` says where."""
    trainer, root = TRAINERS[spec.kind], os.path.join(work_dir, spec.name)
    row = {"name": spec.name, "spec": spec.text, "kind": spec.kind, "iterations": None,
           "calibrated_seconds_per_iter": None, "train_seconds": None, "seconds_per_iter": None,
           **dict.fromkeys(METRICS)}
    try:
        calibration = run_config(spec, os.path.join(root, "calibration"), CALIBRATION_WARMUP + CALIBRATION_ITERS,
                                 calibrate=True)
        calibrated = seconds_per_iteration(trainer(spec, calibration, registries)[1])
        iters = max(1, int(budget / calibrated))
        log(f"{spec.name}: {calibrated:.4f} s/iteration calibrated -> {iters} iterations", flush=True)
        cfg = run_config(spec, os.path.join(root, "run"), iters)
        row |= {"iterations": iters, "calibrated_seconds_per_iter": calibrated,
                "settings": to_dict(cfg) if spec.kind == "detkit" else torchvision_settings(spec, cfg)}
        model, clock = trainer(spec, cfg, registries)
    except FloatingPointError as exc:
        log(f"{spec.name}: diverged: {exc}", flush=True)
        return row | {"error": str(exc)}
    row |= {"train_seconds": clock[iters], "seconds_per_iter": clock[iters] / iters}
    row |= evaluate(model, cfg.data.test, registries, resolve_device(cfg.train.device), spec.kind == "detkit")
    log(f"{spec.name}: {iters} iterations in {row['train_seconds']:.1f} s; AP {row['AP']:.3f}, "
        f"AP50 {row['AP50']:.3f}, APs {row['APs']:.3f}", flush=True)
    return row


def torchvision_settings(spec: Spec, cfg: Config) -> dict:
    """What a torchvision run read from its config (see the module docstring)."""
    t, d = cfg.train, cfg.data
    return {"model": spec.target, "backbone": TORCHVISION_MODELS[spec.target], "weights": None,
            "trainable_layers": 5, "min_size": cfg.model.transform.min_size,
            "max_size": cfg.model.transform.max_size, "batch_size": d.batch_size, "num_workers": d.num_workers,
            "augment": to_dict(d.augment), "lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay,
            "max_iters": t.max_iters, "warmup_iters": t.warmup_iters, "warmup_factor": t.warmup_factor,
            "steps": t.steps, "gamma": t.gamma, "seed": t.seed, "device": t.device}


# ----------------------------------------------------------------------------- reporting


def _number(value: float | None, fmt: str) -> str:
    return "diverged" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: name, iterations, s/iter, train time, AP, AP50, APs."""
    cells = [(r["name"], _number(r["iterations"], "d"), _number(r["seconds_per_iter"], ".4f"),
              _number(r["train_seconds"], ".1f"), *(_number(r[k], ".3f") for k in METRICS)) for r in rows]
    return markdown_table(("name", "iterations", "s/iter", "train time (s)", *METRICS), cells)


def markdown(report: dict) -> str:
    """A docs/benchmarks.md section of a report (``tools/budget.py --output``'s JSON): the machine, the
    command, how the budget was spent, the table."""
    lines = [f"### Same wall-clock budget: {report['budget_s']:g} s of training", "",
             f"Machine: {report['machine']}; load average after the runs: {report['load_average']}.", "",
             f"Command: `{report['command']}`", "",
             f"Train: `{report['train']}`, test: `{report['test']}`. Each run: {CALIBRATION_WARMUP} + "
             f"{CALIBRATION_ITERS} calibration iterations, then budget / (s/iteration) iterations from fresh "
             f"weights with one learning-rate step at {STEP_AT:.0%}; the train time excludes evaluation.", "",
             table(report["rows"]), ""]
    lines += [f"- {r['name']}: `{r['spec']}`" for r in report["rows"]]
    return "\n".join(lines)
