"""Time and accuracy of the lineage on the same images: R-CNN, SPP-net, Fast R-CNN, Faster R-CNN.

The table has the form of the Faster R-CNN paper's timing table (Table 5 of Ren et al. 2015): per image,
the time spent finding proposals, in shared convolutions, in region-wise computation (RoI pooling or
warping + fully connected layers + classifier + NMS), and in total, beside the mAP on those images.
Proposals are computed afresh for every image (selective search on the CPU, as the papers timed it;
the RPN on the model's device). For R-CNN, whose CNN runs on every warped window, the trunk's time is
counted under "conv". Stages are timed with forward hooks around the trunk(s) and the proposal source;
region-wise time is the rest of the detector's forward, split further into the RoI head (RoI extractor,
box head and predictor, less the trunk where the extractor holds it) and everything else (``post``:
resizing the input, decoding, clipping, per-class NMS and rescaling the detections).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from detkit.benchmarks.common import Stopwatch, markdown_table, sync
from detkit.data.dataset import DetectionDataset
from detkit.data.images import to_chw_tensor
from detkit.engine.devices import autocast


@contextmanager
def _stage_timer(modules: list[nn.Module], device: torch.device, totals: dict, key: str):
    """Adds the wall time spent inside ``modules``' forwards to ``totals[key]``."""
    handles = []
    start: list[float] = []

    def pre(*_):
        sync(device)
        start.append(time.perf_counter())

    def post(*_):
        sync(device)
        totals[key] += time.perf_counter() - start.pop()

    for m in modules:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _conv_modules(model: nn.Module) -> list[nn.Module]:
    extractor_trunk = getattr(model.roi_heads.roi_extractor, "trunk", None)
    return [extractor_trunk] if extractor_trunk is not None else [model.trunk]


def _head_modules(model: nn.Module) -> list[nn.Module]:
    heads = model.roi_heads
    return [heads.roi_extractor, heads.box_head, heads.predictor]


@torch.no_grad()
def time_detector(model: nn.Module, dataset: DetectionDataset, indices: list[int], device: torch.device,
                  warmup: int = 1, amp: str = "none") -> dict:
    """Per-image mean seconds of ``proposal``, ``conv``, ``region`` (= ``box_head`` + ``post``) and
    ``total``, plus the detections (original coordinates) of every image in ``indices``; ``amp`` runs the
    detector under autocast (``none``, ``bf16``, ``fp16``)."""
    model.eval().to(device)
    generator = model.proposal_generator
    trunk_in_extractor = getattr(model.roi_heads.roi_extractor, "trunk", None) is not None
    keys = ("proposal", "conv", "roi_head", "total")
    totals = dict.fromkeys(keys, 0.0)
    detections = []
    for n, i in enumerate([indices[0]] * warmup + list(indices)):
        counted = n >= warmup
        image, target = dataset[i]
        img = to_chw_tensor(image, device)
        step = dict.fromkeys(keys, 0.0)
        with Stopwatch(device) as total:
            with Stopwatch(device) as propose:
                proposals = generator.propose([img])  # selective search: from the image; the RPN: None
            with _stage_timer(_conv_modules(model), device, step, "conv"), \
                    _stage_timer(_head_modules(model), device, step, "roi_head"), \
                    _stage_timer([] if proposals is not None else [generator], device, step, "proposal"), \
                    autocast(device, amp):
                det = model([img], None, proposals)[0]
        step["proposal"] += propose.seconds
        step["total"] = total.seconds
        if trunk_in_extractor:  # R-CNN: the trunk runs inside the extractor, counted under conv
            step["roi_head"] -= step["conv"]
        if counted:
            for k in keys:
                totals[k] += step[k]
            detections.append({"image_id": int(target["image_id"]), **{k: v.cpu() for k, v in det.items()}})
    count = len(indices)
    out = {k: v / count for k, v in totals.items()}
    out["region"] = max(0.0, out["total"] - out["proposal"] - out["conv"])
    out["post"] = max(0.0, out["region"] - out["roi_head"])
    return {"seconds": out, "detections": detections}


def subset(dataset: DetectionDataset, indices: list[int]) -> DetectionDataset:
    """The images ``indices`` of ``dataset`` as a dataset of their own (for scoring those images only)."""
    return DetectionDataset([dataset.records[i] for i in indices], dataset.class_names, dataset.cat_ids,
                            f"{dataset.source} (images {indices[0]}..{indices[-1]})")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def timing_table(rows: list[dict]) -> str:
    """Rows ``{"name", "seconds": {...}, "map50", "map"}`` as the paper-style markdown table (milliseconds);
    the region-wise time is followed by its split (RoI head / post-processing). Rows of untrained models
    (``"untrained": True``) show no AP: their detections time the work but score nothing."""
    cells = []
    for r in rows:
        s = r["seconds"]
        split = f" ({_ms(s['roi_head'])} / {_ms(s['post'])})" if "roi_head" in s else ""
        ap = ("n/a (untrained)", "n/a") if r.get("untrained") else (f"{r['map50']:.3f}", f"{r['map']:.3f}")
        cells.append((r["name"], _ms(s["proposal"]), _ms(s["conv"]), _ms(s["region"]) + split, _ms(s["total"]),
                      f"{1 / max(s['total'], 1e-12):.2f} fps", *ap))
    return markdown_table(("method", "proposals", "conv", "region-wise (RoI head / post)", "total", "rate", "AP50",
                           "AP"), cells, align="lrrrrrrr")
