"""Training and evaluation loops.

Training is iteration-based SGD with momentum and weight decay, a linear warmup
and step decay of the learning rate (Faster R-CNN Sec. 3.3: 0.001 for 60k
mini-batches, then 0.0001 for 20k on VOC). The loop never assumes one device:
the model, the batches and the optimizer follow ``train.device``, and nothing
but logging reads values back to the host, so a DistributedDataParallel wrapper
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
    in both samplers (``roi_head.bg_iou_thresh_lo > 0`` can leave an image too few
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

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn

from detkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkit.config import Config, ConfigError, check_kwargs, dump, to_dict
from detkit.distributed import DistInfo, barrier, gather_objects, init_from_env, mean_over_ranks, shutdown
from detkit.models.detector import build_detector

log = logging.getLogger(__name__)

RESERVED_DATASET_KEYS = ("transform", "skip_empty")


# ----------------------------------------------------------------------------- data


def build_dataset(spec: dict | None, registries, key: str, transform=None, skip_empty: bool = False):
    """Build the dataset described by ``data.<key>`` (``{name: coco, ...builder args}``)."""
    if not spec:
        raise ConfigError(f"data.{key}: no dataset configured (expected e.g. {{name: coco, images: DIR, "
                          f"annotations: FILE}})")
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"data.{key}.name: expected a registered dataset name "
                          f"({', '.join(registries.datasets)}), got {name!r}")
    for reserved in RESERVED_DATASET_KEYS:
        if reserved in spec:
            raise ConfigError(f"data.{key}.{reserved}: set by detkit, not by the config")
    entry = registries.datasets.get(name)
    check_kwargs(entry.builder, {**spec, "transform": None, "skip_empty": False}, f"data.{key}")
    return entry.builder(**spec, transform=transform, skip_empty=skip_empty)


def to_tensor_batch(batch):
    """Collate dataset samples ``(HxWx3 uint8 array, target)`` into lists of ``(3, H, W)`` uint8 tensors."""
    images, targets = [], []
    for image, target in batch:
        images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        targets.append(target)
    return images, targets


class _PositionSeeded(torch.utils.data.Dataset):
    """Takes ``(index, seed)`` pairs so a sample's augmentation depends only on its stream position; the
    target gets the seed as ``sample_seed``, for the detector's anchor and RoI samplers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_seed"):
            transform.set_seed(seed)
        image, target = self.dataset[index]
        return image, {**target, "sample_seed": seed}


class StreamBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of ``(index, seed)`` from one global sample stream.

    Epoch e of the stream is a permutation drawn from ``seed`` and e; sample at
    stream position p gets augmentation seed derived from p. Each iteration
    consumes ``batch_size * world_size`` positions and rank r takes its slice,
    so N processes see exactly the samples one process with an N-times larger
    batch would see, and resuming at ``start_position`` (samples consumed so
    far) works with any number of processes.
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, start_position: int = 0,
                 rank: int = 0, world_size: int = 1, groups: list[int] | None = None):
        if not indices:
            raise ValueError("the training set has no usable images")
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.start = start_position
        self.rank = rank
        self.world_size = world_size
        # Aspect-ratio grouping: groups[k] is the group of indices[k]; every global batch is drawn from one
        # group (each epoch: shuffle, split by group, cut into global batches, shuffle the batches).
        self.groups = groups
        self.epoch_length = len(self.indices)
        if groups is not None:
            step = batch_size * world_size
            sizes = [sum(1 for g in groups if g == v) for v in sorted(set(groups))]
            self.epoch_length = sum(n // step * step for n in sizes)
            if self.epoch_length == 0:
                raise ValueError(f"no aspect-ratio group has a full batch of {step} images")

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(len(self.indices), generator=generator).tolist()
        if self.groups is None:
            return perm
        step = self.batch_size * self.world_size
        batches = []
        for value in sorted(set(self.groups)):
            members = [k for k in perm if self.groups[k] == value]
            batches += [members[i:i + step] for i in range(0, len(members) - step + 1, step)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [k for b in order for k in batches[b]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = self.epoch_length
        position = self.start
        order, order_epoch = None, -1
        while True:
            batch = []
            for p in range(position + self.rank * self.batch_size, position + (self.rank + 1) * self.batch_size):
                epoch, offset = divmod(p, n)
                if epoch != order_epoch:
                    order, order_epoch = self.epoch_order(epoch), epoch
                batch.append((self.indices[order[offset]], self.seed * 1000003 + p))
            position += self.batch_size * self.world_size
            yield batch

    def __len__(self):  # an infinite stream; DataLoader only needs this for len()
        return 2**62


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine")
    return device


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


def find_last_checkpoint(work_dir: str) -> str | None:
    if not os.path.isdir(work_dir):
        return None
    names = [n for n in os.listdir(work_dir) if n.startswith("iter_") and n.endswith(".pth")]
    if os.path.isfile(os.path.join(work_dir, "final.pth")):
        return os.path.join(work_dir, "final.pth")
    if not names:
        return None
    return os.path.join(work_dir, max(names, key=lambda n: int(n[5:-4])))


def _truncate_log(path: str, last_iter: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("iter", 0) <= last_iter]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


# ----------------------------------------------------------------------------- train


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ConfigError(f"train.amp={amp!r}: expected none, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtypes[amp])


def train(cfg: Config, registries, resume: str | bool | None = None, progress: bool = True) -> dict:
    """Train the configured detector; returns ``{"checkpoint": path, "metrics": dict | None}``.

    ``train.schedule: four_step`` runs Faster R-CNN's alternating training; a detector with the ``svm``
    head (R-CNN, SPP-net) is fine-tuned with a softmax classifier and then gets its SVMs and box regressor
    (``detkit.pipelines``). Everything else is one stage of SGD.
    """
    staged = cfg.train.schedule == "four_step" or cfg.model.roi_head.name == "svm"
    if staged and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.schedule=four_step and the svm head train in stages in one process; run them "
                          "without torchrun (each step may still use a GPU)")
    if cfg.train.schedule == "four_step":
        from detkit.pipelines import train_four_step

        return train_four_step(cfg, registries, resume=resume, progress=progress)
    if cfg.train.schedule != "end_to_end":
        raise ConfigError(f"train.schedule={cfg.train.schedule!r}: expected end_to_end or four_step")
    if cfg.model.roi_head.name == "svm":
        from detkit.pipelines import train_with_svms

        return train_with_svms(cfg, registries, resume=resume, progress=progress)
    return train_stage(cfg, registries, resume, progress)


def attach_proposals(dataset, model: nn.Module, cfg: Config, progress: bool = True,
                     info: DistInfo | None = None) -> None:
    """Give ``dataset`` the selective-search boxes its detector takes, computing the missing ones into the
    per-dataset cache (``model.selective_search``; rank 0 computes, the other ranks wait and read)."""
    generator = getattr(model, "proposal_generator", None)
    if not hasattr(generator, "settings") or getattr(dataset, "proposals", None) is not None:
        return
    from detkit.proposals.cache import selective_search_cache

    info = info or DistInfo()
    ss = cfg.model.selective_search
    settings = generator.settings()  # what the boxes depend on: the cache is named by it
    if info.is_main:
        cache = selective_search_cache(ss.cache_dir, dataset, **settings, num_workers=ss.num_workers,
                                       progress=progress)
    barrier(info)
    if not info.is_main:
        cache = selective_search_cache(ss.cache_dir, dataset, **settings, compute=False)
    dataset.proposals = cache


def train_stage(cfg: Config, registries, resume: str | bool | None = None, progress: bool = True, *,
                init=None, loss_prefixes: tuple[str, ...] | None = None, proposals=None) -> dict:
    """One stage of SGD on the configured detector; returns ``{"checkpoint", "metrics", "model"}``.

    Runs as one process, or as one of N under ``torchrun`` (DistributedDataParallel;
    logging, checkpoints and the metric on rank 0). Staged schedules (``detkit.pipelines``) pass
    ``init(model)`` (load earlier stages' weights, freeze what a step keeps fixed; called before the
    optimizer is built), ``loss_prefixes`` (train only the losses of some stages, e.g. ``("rpn/",)``) and
    ``proposals`` (a proposal source ``get(index)`` for the training set, e.g. a cache of RPN proposals).
    """
    from detkit.data import build_transform  # heavy imports (albumentations) only when training

    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    info = init_from_env(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    work_dir = tcfg.work_dir
    if info.is_main:
        os.makedirs(work_dir, exist_ok=True)
    seed_everything(tcfg.seed + info.rank)

    aug = cfg.data.augment
    try:
        transform = build_transform(train=True, hflip=aug.hflip, scale=aug.scale, crop=aug.crop,
                                    color_jitter=aug.color_jitter)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dataset = build_dataset(cfg.data.train, registries, "train", transform=transform,
                            skip_empty=cfg.data.skip_empty)
    if len(dataset) == 0:
        raise ConfigError("data.train: the dataset has no images")
    names = list(dataset.class_names)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(names):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.train has {len(names)} classes "
                          f"({', '.join(names)})")
    cfg.model.num_classes = len(names)
    cfg.model.class_names = names
    if cfg.model.backbone.frozen_bn is None:
        # Resolved once here so the checkpoint's config rebuilds the same module types without the weights file.
        cfg.model.backbone.frozen_bn = bool(cfg.model.backbone.weights)
    model = build_detector(cfg.model, registries, len(names), names).to(device)
    if init is not None:
        init(model)
    if proposals is not None:
        dataset.proposals = proposals
    else:
        attach_proposals(dataset, model, cfg, progress, info)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if tcfg.compile:
        model.trunk.compile()  # in place: parameter names (and so checkpoints) are unchanged
    base_lr = tcfg.lr * (info.world_size if tcfg.scale_lr else 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=base_lr,
                                momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp == "fp16")

    start_iter, position = 0, 0
    resume_path = find_last_checkpoint(work_dir) if resume is True else (resume or None)
    if resume and resume_path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {work_dir}")
    if resume_path:
        ckpt = load_checkpoint(resume_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():
            # Without it an fp16 run would restart from the initial scale and skip (or take) other steps.
            scaler.load_state_dict(ckpt["scaler"])
        start_iter = ckpt["iteration"]
        position = ckpt.get("samples_seen", start_iter * cfg.data.batch_size)
        if ckpt.get("world_size", 1) == info.world_size:
            _set_rng_state(ckpt.get("rng"))
        log.info("resumed from %s at iteration %d (%d samples seen)", resume_path, start_iter, position)
    if info.enabled:
        if tcfg.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model
    log_path = os.path.join(work_dir, "log.jsonl")
    if info.is_main:
        with open(os.path.join(work_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump(cfg))
        if start_iter:
            _truncate_log(log_path, start_iter)
        elif os.path.exists(log_path):
            os.remove(log_path)

    indices = getattr(dataset, "train_indices", None) or list(range(len(dataset)))
    groups = None
    if cfg.data.group_by_aspect_ratio:
        groups = [int(dataset.image_info(i)["width"] >= dataset.image_info(i)["height"]) for i in indices]
    loader = torch.utils.data.DataLoader(
        _PositionSeeded(dataset),
        batch_sampler=StreamBatchSampler(indices, cfg.data.batch_size, tcfg.seed, position, info.rank,
                                         info.world_size, groups),
        num_workers=cfg.data.num_workers,
        collate_fn=to_tensor_batch,
        pin_memory=device.type == "cuda",
        # Its own generator: creating the iterator must not draw from the global RNG that a resumed
        # run restores for the samplers.
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    for group in optimizer.param_groups:
        group["lr"] = base_lr * lr_factor(start_iter, tcfg)
        group["initial_lr"] = base_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, tcfg), last_epoch=start_iter - 1)
    global_batch = cfg.data.batch_size * info.world_size

    def checkpoint(path: str, iteration: int) -> None:
        save_checkpoint(path, model_state=model.state_dict(), config=to_dict(cfg), iteration=iteration,
                        class_names=names, cat_ids=list(dataset.cat_ids),
                        optimizer_state=optimizer.state_dict(), rng_state=_rng_state(),
                        samples_seen=position + (iteration - start_iter) * global_batch,
                        world_size=info.world_size, scaler_state=scaler.state_dict())

    ddp.train()
    for module in model.modules():
        # Parts a staged schedule keeps fixed run as at test time (batch-norm statistics unchanged).
        if getattr(module, "detkit_frozen", False):
            module.eval()
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.max_iters, initial=start_iter, desc="train", dynamic_ncols=True, mininterval=1.0)
    data_iter = iter(loader)
    t0 = time.time()
    log_file = open(log_path, "a", encoding="utf-8") if info.is_main else None
    try:
        for iteration in range(start_iter, tcfg.max_iters):
            images, targets = next(data_iter)
            images = [img.to(device, non_blocking=True) for img in images]
            props = ([t["proposals"].to(device, non_blocking=True) for t in targets]
                     if "proposals" in targets[0] else None)
            targets = [{"boxes": t["boxes"].to(device, non_blocking=True),
                        "labels": t["labels"].to(device, non_blocking=True),
                        "sample_seed": t["sample_seed"]} for t in targets]
            with _autocast(device, tcfg.amp):
                losses = ddp(images, targets, props)
            if loss_prefixes is not None:
                losses = {k: v for k, v in losses.items() if k.startswith(loss_prefixes)}
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if tcfg.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            done = iteration + 1
            # Host reads (which sync the GPU) only on logging iterations. The logged losses are those of the
            # global batch (the mean over the ranks), as one process with that batch would log them.
            if done % tcfg.log_period == 0 or done == tcfg.max_iters or done == start_iter + 1:
                means = mean_over_ranks(torch.stack([v.detach().float() for v in losses.values()]), info)
                values = dict(zip(losses, means.tolist()))
                values["total"] = sum(values.values())
                if not math.isfinite(values["total"]):
                    raise FloatingPointError(f"iteration {done}: loss is {values} (lower train.lr or set "
                                             f"train.clip_grad_norm)")
                if log_file is not None:
                    record = {"iter": done, "lr": lr, **values, "time": round(time.time() - t0, 3)}
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.set_postfix({k.split("/")[-1] if "/" in k else k: f"{v:.3f}" for k, v in values.items()}
                                    | {"lr": f"{lr:.2g}"})
            if bar is not None:
                bar.update(1)
            if (info.is_main and tcfg.checkpoint_period and done % tcfg.checkpoint_period == 0
                    and done < tcfg.max_iters):
                checkpoint(os.path.join(work_dir, f"iter_{done:07d}.pth"), done)
    finally:
        if log_file is not None:
            log_file.close()
        if bar is not None:
            bar.close()
    final = os.path.join(work_dir, "final.pth")
    if info.is_main:
        checkpoint(final, tcfg.max_iters)
        log.info("saved %s", final)
        from detkit.reports import plot_training_curves

        plot_training_curves(log_path, os.path.join(work_dir, "training_curves.png"))
    barrier(info)
    metrics = None
    if tcfg.eval_at_end and cfg.data.test:
        model.eval()
        metrics = evaluate(model, cfg, registries, device=device, out_dir=work_dir, dist_info=info,
                           progress=progress)
    shutdown(info)
    return {"checkpoint": final, "metrics": metrics, "model": model}


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset, device: torch.device, batch_size: int = 1,
                    num_workers: int = 0, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Detections for the images of ``dataset`` (those of ``shard = (rank, world_size)``),
    in original-image coordinates, on the CPU."""
    rank, world = shard
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=to_tensor_batch)
    model.eval()
    outputs: list[dict] = []
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", dynamic_ncols=True, mininterval=1.0)
    for images, targets in iterator:
        props = [t["proposals"].to(device) for t in targets] if "proposals" in targets[0] else None
        dets = model([img.to(device) for img in images], None, props)
        for det, target in zip(dets, targets):
            outputs.append({"image_id": int(target["image_id"]), **{k: v.cpu() for k, v in det.items()}})
    return outputs


def evaluate(model: nn.Module, cfg: Config, registries, device: torch.device, out_dir: str,
             dataset=None, progress: bool = True, dist_info: DistInfo | None = None) -> dict | None:
    """COCO-style evaluation on ``data.test`` (or ``dataset``); writes ``metrics.json`` and results JSON.

    Under torch.distributed each rank predicts a shard; rank 0 gathers, scores and
    writes (other ranks return None).
    """
    info = dist_info or DistInfo()
    from detkit.evaluation import detections_to_coco_results
    from detkit.media import write_json_atomic

    if dataset is None:
        dataset = build_dataset(cfg.data.test, registries, "test")
    if len(dataset) == 0:
        raise ConfigError("data.test: the dataset has no images")
    names = cfg.model.class_names or []
    if list(dataset.class_names) != list(names):
        raise ConfigError(f"the evaluation dataset's classes {list(dataset.class_names)} differ from the model's "
                          f"{list(names)}")
    attach_proposals(dataset, model, cfg, progress, info)
    score_thresh = cfg.eval.score_thresh
    predictions = predict_dataset(model, dataset, device, batch_size=1, num_workers=cfg.data.num_workers,
                                  progress=progress and info.is_main, shard=(info.rank, info.world_size))
    predictions = [p for part in gather_objects(predictions, info) for p in part]
    if not info.is_main:
        return None
    results = []
    for det in predictions:
        if score_thresh is not None:
            keep = det["scores"] >= score_thresh
            det = {k: (v[keep] if torch.is_tensor(v) else v) for k, v in det.items()}
        results.extend(detections_to_coco_results(det["image_id"], det, list(dataset.cat_ids)))
    gt = dataset.to_coco()
    metrics = score_results(gt, results, cfg.eval.metric, cfg.eval.backend, list(names))
    from detkit.reports import evaluation_report

    metrics["errors"] = evaluation_report(dataset, gt, results, out_dir, list(names))
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    print(format_metrics(metrics))
    return metrics


def score_results(gt: dict, results: list[dict], metric: str, backend: str = "faster_coco_eval",
                  class_names: list[str] | None = None) -> dict:
    """COCO or VOC metrics of COCO-format ``results`` against a COCO-format ground truth."""
    from detkit.evaluation import evaluate_coco
    from detkit.evaluation.voc_eval import evaluate_voc

    if metric == "coco":
        return {"metric": "coco", **evaluate_coco(gt, results, backend=backend, class_names=class_names)}
    if metric in ("voc07", "voc"):
        return evaluate_voc(gt, results, metric=metric, class_names=class_names)
    raise ConfigError(f"eval.metric={metric!r}: expected coco, voc07 or voc")


def format_metrics(metrics: dict) -> str:
    from detkit.evaluation import format_metrics_table
    from detkit.evaluation.voc_eval import format_voc_table

    return format_voc_table(metrics) if metrics.get("metric") in ("voc07", "voc") else format_metrics_table(metrics)


def model_from_checkpoint(path: str, registries, device: torch.device, overrides: list[str] | None = None):
    """Rebuild the model a checkpoint was trained with; returns ``(model, cfg, ckpt)``."""
    from detkit.config import apply_overrides, from_dict

    ckpt = load_checkpoint(path, map_location="cpu")
    data = apply_overrides(ckpt["config"], overrides or [])
    cfg = from_dict(data, source=f"{path} (embedded config)")
    names = list(ckpt["class_names"])
    # Weights come from the checkpoint; the backbone's own file is not needed (or read) again.
    cfg.model.backbone.weights = None
    model = build_detector(cfg.model, registries, len(names), names)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, ckpt
