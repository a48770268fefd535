"""Time and accuracy of the lineage on the same images: R-CNN, SPP-net, Fast R-CNN, Faster R-CNN.

The table has the form of the Faster R-CNN paper's timing table (Table 5 of Ren et al. 2015): per image,
the time spent finding proposals, in shared convolutions, in region-wise computation (RoI pooling or
warping + fully connected layers + classifier + NMS), and in total, beside the mAP on those images.
Proposals are computed afresh for every image (selective search on the CPU, as the papers timed it;
the RPN on the model's device). For R-CNN, whose CNN runs on every warped window, the trunk's time is
counted under "conv". Stages are timed with forward hooks around the trunk(s) and the proposal source;
region-wise time is the rest of the detector's forward.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from detkit.data.dataset import DetectionDataset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _stage_timer(modules: list[nn.Module], device: torch.device, totals: dict, key: str):
    """Adds the wall time spent inside ``modules``' forwards to ``totals[key]``."""
    handles = []
    start: list[float] = []

    def pre(*_):
        _sync(device)
        start.append(time.perf_counter())

    def post(*_):
        _sync(device)
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


@torch.no_grad()
def time_detector(model: nn.Module, dataset: DetectionDataset, indices: list[int], device: torch.device,
                  warmup: int = 1) -> dict:
    """Per-image mean seconds of ``proposal``, ``conv``, ``region`` and ``total``, plus the detections
    (original coordinates) of every image in ``indices``."""
    model.eval().to(device)
    generator = model.proposal_generator
    totals = {"proposal": 0.0, "conv": 0.0, "total": 0.0}
    detections = []
    for n, i in enumerate([indices[0]] * warmup + list(indices)):
        counted = n >= warmup
        image, target = dataset[i]
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(device)
        step = {"proposal": 0.0, "conv": 0.0}
        _sync(device)
        t0 = time.perf_counter()
        proposals = None
        if getattr(generator, "needs_proposals", False):
            proposals = generator.propose([img])
            step["proposal"] += time.perf_counter() - t0
        with _stage_timer(_conv_modules(model), device, step, "conv"), \
                _stage_timer([] if proposals is not None else [generator], device, step, "proposal"):
            det = model([img], None, proposals)[0]
        _sync(device)
        elapsed = time.perf_counter() - t0
        if counted:
            totals["proposal"] += step["proposal"]
            totals["conv"] += step["conv"]
            totals["total"] += elapsed
            detections.append({"image_id": int(target["image_id"]), **{k: v.cpu() for k, v in det.items()}})
    count = len(indices)
    out = {k: v / count for k, v in totals.items()}
    out["region"] = max(0.0, out["total"] - out["proposal"] - out["conv"])
    return {"seconds": out, "detections": detections}


def subset(dataset: DetectionDataset, indices: list[int]) -> DetectionDataset:
    """The images ``indices`` of ``dataset`` as a dataset of their own (for scoring those images only)."""
    return DetectionDataset([dataset.records[i] for i in indices], dataset.class_names, dataset.cat_ids,
                            f"{dataset.source} (images {indices[0]}..{indices[-1]})")


def markdown_table(rows: list[dict]) -> str:
    """Rows ``{"name", "seconds": {...}, "map50", "map"}`` as the paper-style table (milliseconds)."""
    lines = ["| method | proposals | conv | region-wise | total | rate | AP50 | AP |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = {k: v * 1000 for k, v in r["seconds"].items()}
        lines.append(f"| {r['name']} | {s['proposal']:.0f} ms | {s['conv']:.0f} ms | {s['region']:.0f} ms | "
                     f"{s['total']:.0f} ms | {1000 / max(s['total'], 1e-9):.2f} fps | {r['map50']:.3f} | "
                     f"{r['map']:.3f} |")
    return "\n".join(lines)
