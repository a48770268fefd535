"""Throughput of ``detkit pretrain`` against the training loop a PyTorch user writes, in one process.

The reference is the shape of PyTorch's official ImageNet example (``pytorch/examples``,
``imagenet/main.py``, ``train``): torchvision's ``ImageFolder`` (PIL decoding) with ``RandomResizedCrop`` (R-CNN
Sec. 2.3's supervised pretraining with GoogLeNet Sec. 6's scale augmentation), ``RandomHorizontalFlip``,
``ToTensor`` and ``Normalize`` in the DataLoader's workers, ``DataLoader(shuffle=True, pin_memory=True)``, and per
step ``images.to(device)``, forward, loss, top-1/top-5 accuracy, ``zero_grad``, ``backward``, ``step``, with the
loss and the top-1 accuracy read on the host every step (the example's ``loss.item()`` and meters).

detkit's side is the real :class:`~detkit.classification.trainer.ClassifierTrainer` built from the config (in a
temporary ``train.work_dir``), running ``SGDTrainer.train``'s loop: ``step()`` (uint8 batches from the seeded
sample stream, normalised on the device), the non-finite guard and the log hook (host reads every
``train.log_period`` iterations); periodic validation and checkpoints are switched off, as their I/O is not
the step's.

Both sides get the same backbone variant with the same initial weights (built by ``build_backbone`` after
seeding with ``train.seed``; :func:`run_pretrain_benchmark` checks they are equal), batch size, DataLoader
workers, SGD settings (``train.lr``, ``momentum``, ``weight_decay``), ``train.amp``, ``channels_last`` and
``compile``. Runs alternate between the sides, in reversed order every other round (ABBA), so background load
hits both alike. Each run starts a fresh iterator (new DataLoader workers); its warm-up iterations absorb the
workers' start-up, so start-up is excluded from both sides alike (with ``warmup=0`` it is counted in both).
Throughput is images/s over the timed iterations (the plain side counts the images of its batches: the
example's last batch of an epoch is smaller, and an epoch's end restarts its workers, as in the example).
"""
from __future__ import annotations

import copy
import math
import tempfile

import torch
from torch import nn

from detkit.benchmarks.common import Stopwatch, interleaved, load_average, machine, markdown_table, medians
from detkit.config import ClassifierConfig, ConfigError

PLAIN_DATASET = "image_folder"
SIDES = ("detkit", "plain")


def check_comparable(cfg: ClassifierConfig) -> None:
    """ValueError unless the plain side can do the same work: an ``image_folder`` training set and
    ``data.augment.crop: resized`` (the example's ``RandomResizedCrop``)."""
    spec = cfg.data.train
    name = spec.get("name") if isinstance(spec, dict) else None
    if name != PLAIN_DATASET:
        raise ValueError(f"data.train.name={name!r}: the plain PyTorch side reads torchvision's ImageFolder, so the "
                         f"pretrain benchmark needs data.train: {{name: {PLAIN_DATASET}, root: DIR}}")
    if not isinstance(spec.get("root"), str):
        raise ValueError(f"data.train.root={spec.get('root')!r}: expected the ImageFolder directory "
                         f"(root/<class>/<image>)")
    if cfg.data.augment.crop != "resized":
        raise ValueError(f"data.augment.crop={cfg.data.augment.crop!r}: the plain PyTorch side is the ImageNet "
                         f"example's RandomResizedCrop; benchmark with --set data.augment.crop=resized")


def plain_transform(augment, size: int, mean: list[float], std: list[float], in_channels: int):
    """The torchvision transform doing what ``ClassifierAugment`` does with ``augment`` (PIL in, float tensor
    ``(C, size, size)`` normalised out): crop, flip, colour jitter, grey for a one-channel network."""
    from torchvision import transforms

    steps = [transforms.RandomResizedCrop(size, scale=tuple(augment.area), ratio=tuple(augment.ratio)),
             transforms.RandomHorizontalFlip(augment.hflip)]
    if augment.color_jitter > 0:
        s = augment.color_jitter
        steps.append(transforms.ColorJitter(brightness=s, contrast=s, saturation=s))
    if in_channels == 1:
        steps.append(transforms.Grayscale(1))  # PIL's L: the luminance Classifier.normalize takes
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 accuracy in percent, as the ImageNet example's ``accuracy``."""
    with torch.no_grad():
        hits = logits.topk(min(5, logits.shape[1]), 1).indices == labels[:, None]
        return hits[:, 0].float().mean() * 100, hits.any(1).float().mean() * 100


class PlainLoop:
    """The ImageNet example's training loop (see the module doc) on ``backbone``, a fresh instance of the
    configured variant; ``mean``/``std``/``in_channels``: the Classifier's input side."""

    def __init__(self, cfg: ClassifierConfig, backbone: nn.Module, device: torch.device, size: int,
                 mean: list[float], std: list[float], in_channels: int):
        from torchvision import datasets

        self.cfg, self.device = cfg, device
        tcfg = cfg.train
        self.dataset = datasets.ImageFolder(cfg.data.train["root"],
                                            plain_transform(cfg.data.augment, size, mean, std, in_channels))
        self.model = backbone.to(device)
        if tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if tcfg.compile:
            self.model.compile()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum,
                                         weight_decay=tcfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp == "fp16")
        self.last = (math.nan, math.nan)  # the last step's loss and top-1, as read on the host

    def loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.data.batch_size, shuffle=True,
                                           num_workers=self.cfg.data.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from detkit.classification.model import main_logits
        from detkit.engine.devices import autocast

        tcfg = self.cfg.train
        images = images.to(self.device, non_blocking=True)
        if tcfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, tcfg.amp):
            outputs = self.model(images)
            loss = self.model.classification_loss(outputs, labels)
        top1, _ = _accuracy(main_logits(outputs), labels)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last = (loss.item(), top1.item())

    def run(self, warmup: int, iters: int) -> tuple[float, int]:
        """``(seconds, images)`` of ``iters`` steps after ``warmup`` on a fresh iterator; an epoch's end
        starts the next epoch's iterator (and workers), as the example's epoch loop does."""
        self.model.train()
        batches = iter(self.loader())

        def steps(n: int) -> int:
            nonlocal batches
            images = 0
            for _ in range(n):
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(self.loader())
                    x, y = next(batches)
                self.step(x, y)
                images += len(y)
            return images

        steps(warmup)
        with Stopwatch(self.device) as watch:
            images = steps(iters)
        del batches  # its workers stop before the other side runs
        return watch.seconds, images


class DetkitLoop:
    """``detkit pretrain``'s trainer on ``cfg`` in ``work_dir`` (validation and checkpoints off), driven by
    ``SGDTrainer.train``'s loop and hooks for ``total_iters`` iterations in all."""

    def __init__(self, cfg: ClassifierConfig, registries, work_dir: str, total_iters: int):
        from detkit.classification.trainer import ClassifierTrainer

        cfg = copy.deepcopy(cfg)
        cfg.train.work_dir = work_dir
        cfg.train.max_iters = total_iters
        cfg.train.checkpoint_period = 0
        cfg.eval.period = 0
        self.trainer = ClassifierTrainer(cfg, registries, progress=False)
        self.done = 0  # iterations run so far, over all runs
        self.trainer.start()  # what SGDTrainer.train does before its loop; each run opens its own stream
        self.trainer.close_stream()

    def run(self, warmup: int, iters: int) -> tuple[float, int]:
        """``(seconds, images)`` of ``iters`` iterations after ``warmup``, the stream reopened at the position
        the previous runs reached (new workers, as a resumed ``detkit pretrain`` starts them)."""
        from detkit.training.loop import train_loop

        trainer = self.trainer
        trainer.position = self.done * trainer.cfg.data.batch_size
        trainer.open_stream()
        hooks = trainer.hooks()
        train_loop(trainer.step, self.done, self.done + warmup, hooks)
        with Stopwatch(trainer.device) as watch:
            train_loop(trainer.step, self.done + warmup, self.done + warmup + iters, hooks)
        self.done += warmup + iters
        trainer.close_stream()  # its workers stop before the other side runs
        return watch.seconds, iters * trainer.cfg.data.batch_size


def build_sides(cfg: ClassifierConfig, registries, work_dir: str, total_iters: int) -> tuple[DetkitLoop, PlainLoop]:
    """Both loops, their backbones built from the same seed; ValueError if their classes differ."""
    from detkit.models.assembly import build_backbone

    ours = DetkitLoop(cfg, registries, work_dir, total_iters)
    trainer = ours.trainer
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model, registries, len(trainer.dataset.class_names))
    defaults = backbone.defaults
    theirs = PlainLoop(cfg, backbone, trainer.device, trainer.size, list(cfg.model.mean or defaults.mean),
                       list(cfg.model.std or defaults.std), defaults.input_size[0])
    if list(theirs.dataset.classes) != list(trainer.dataset.class_names) or len(theirs.dataset) != len(trainer.dataset):
        raise ValueError(f"data.train.root={cfg.data.train['root']!r}: torchvision's ImageFolder finds "
                         f"{len(theirs.dataset)} images of {len(theirs.dataset.classes)} classes, detkit's "
                         f"{len(trainer.dataset)} of {len(trainer.dataset.class_names)}: the sides would not "
                         f"train on the same data")
    return ours, theirs


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold equal parameters and buffers under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _rate(seconds: float, images: int) -> float:
    """Images per second."""
    return images / seconds


def run_pretrain_benchmark(cfg: ClassifierConfig, registries, iters: int = 50, warmup: int = 10,
                           runs: int = 3) -> dict:
    """Images/s of detkit's pretraining and of the plain loop on ``cfg`` (see the module doc).

    Returns ``{"setup", "runs": {"detkit": [...], "plain": [...]} (images/s per run), "median": {...},
    "ratio" (detkit / plain: > 1, detkit faster), "same_initial_weights", "last_plain_step": {"loss",
    "top1"}}``."""
    if iters < 1 or warmup < 0 or runs < 1:
        raise ValueError(f"iters={iters}, warmup={warmup}, runs={runs}: expected iters >= 1, warmup >= 0, runs >= 1")
    check_comparable(cfg)
    with tempfile.TemporaryDirectory(prefix="detkit-pretrain-bench-") as work_dir:
        ours, theirs = build_sides(cfg, registries, work_dir, runs * (warmup + iters))
        sides = {"detkit": ours, "plain": theirs}
        same = same_weights(ours.trainer.model.backbone, theirs.model)
        rates = interleaved({name: (lambda side=sides[name]: _rate(*side.run(warmup, iters))) for name in SIDES},
                            runs)
        trainer = ours.trainer
        setup = {"backbone": cfg.model.backbone.name, "input_size": trainer.size, "device": str(trainer.device),
                 "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers,
                 "images": len(trainer.dataset), "classes": len(trainer.dataset.class_names),
                 "lr": cfg.train.lr, "momentum": cfg.train.momentum, "weight_decay": cfg.train.weight_decay,
                 "amp": cfg.train.amp, "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
                 "iters": iters, "warmup": warmup, "runs": runs,
                 "worker_startup": "excluded" if warmup else "counted"}
    median = medians(rates)
    return {"machine": machine(), "load_average": load_average(), "setup": setup, "runs": rates, "median": median,
            "ratio": median["detkit"] / median["plain"], "same_initial_weights": same,
            "last_plain_step": dict(zip(("loss", "top1"), theirs.last))}


def table(result: dict) -> str:
    """The result as text: the setup, then a markdown table of every run's images/s on each side and the
    medians, with the ratios."""
    s = result["setup"]
    lines = [f"Machine: {result['machine']}; load average: {result['load_average']}.",
             f"{s['backbone']} at {s['input_size']}x{s['input_size']}, batch {s['batch_size']}, {s['num_workers']} "
             f"workers, {s['images']} images of {s['classes']} classes, device {s['device']}, amp {s['amp']}; "
             f"{s['runs']} runs of {s['iters']} iterations after {s['warmup']} warm-up (DataLoader worker start-up "
             f"{s['worker_startup']} on both sides); same initial weights: {result['same_initial_weights']}.", ""]
    runs = [(f"run {k}", f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}")
            for k, (a, b) in enumerate(zip(result["runs"]["detkit"], result["runs"]["plain"]), 1)]
    m = result["median"]
    runs.append(("median", f"{m['detkit']:.1f}", f"{m['plain']:.1f}", f"{result['ratio']:.2f}"))
    lines.append(markdown_table(("run", "detkit img/s", "plain img/s", "ratio"), runs, align="lrrr"))
    return "\n".join(lines)


def load_benchmark_config(path: str, overrides: list[str], device: str | None = None) -> ClassifierConfig:
    """The classifier config at ``path`` with ``--set`` overrides (and ``--device``), checked for the plain
    side (:func:`check_comparable`)."""
    from detkit.config import load_config

    cfg = load_config(path, overrides, schema=ClassifierConfig)
    if device is not None:
        cfg.train.device = device
    try:
        check_comparable(cfg)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
