"""The dataset base class: records in, sanitised ``(image, target)`` samples out.

Format loaders (COCO, VOC) only parse their files into records; this class owns
what every format shares: box sanitisation (clip to the image, drop degenerate
boxes, count both in the log), the mapping between contiguous labels (1..K, 0 is
background) and the original category ids, augmentation, and export of the
ground truth as a COCO dict for the metric.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field

import numpy as np
import torch

from detkit.data.images import ImageReadError, read_image

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file with an invalid entry; the message names the file and the entry."""


@dataclass
class ImageRecord:
    """One image's annotations. boxes ``(N, 4)`` float32 xyxy pixels; labels ``(N,)`` in 1..K; area ``(N,)``
    the object areas the source file states (COCO's segment areas, NaN where unknown: the box area is used)."""

    id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    area: np.ndarray | None = None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es"


def sanitize_boxes(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Clip ``boxes (N, 4)`` xyxy to ``[0, width] x [0, height]``.

    Returns ``(clipped (N, 4) float32, n_clipped, keep (N,) bool)``: ``keep`` is False for boxes with a
    non-finite coordinate and for boxes left with zero or negative width or height after clipping;
    ``n_clipped`` counts the kept boxes that clipping changed.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    changed = finite & (np.abs(clipped - boxes) > 1e-6).any(axis=1)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, int((changed & keep).sum()), keep


class DetectionDataset(torch.utils.data.Dataset):
    """Base of every dataset format.

    ``__getitem__(i)`` returns ``(image (H, W, 3) uint8 RGB, target)`` with target keys
    ``boxes`` (N, 4) float32, ``labels`` (N,) int64 in 1..K, ``difficult``/``iscrowd`` (N,) bool
    (crowd regions are not training targets and are left out), ``image_id``, ``orig_size`` (h, w)
    and ``file_name``.

    ``class_names[i]`` is the name of label ``i + 1`` and ``cat_ids[i]`` its category id in the source
    files (for results files). ``train_indices`` is, with ``skip_empty=True``, the indices of the images
    with at least one non-crowd box (the trainer samples only those), else None. Boxes are sanitised
    once, here: clipped to the image, and dropped when non-finite or without area after clipping; the
    counts are logged once per dataset. A transform, when given, is called as
    ``transform(image, boxes, labels, {"difficult": difficult}) -> (image, boxes, labels, extra)``.
    """

    def __init__(self, records: list[ImageRecord], class_names: list[str], cat_ids: list[int], source: str,
                 transform=None, skip_empty: bool = False):
        if not records:
            raise DatasetError(f"{source}: the dataset has no images")
        self.source = source
        self.class_names = list(class_names)
        self.cat_ids = list(cat_ids)
        self.transform = transform
        self.records = records
        clipped = dropped = 0
        for r in records:
            boxes, n_clipped, keep = sanitize_boxes(r.boxes, r.height, r.width)
            clipped += n_clipped
            dropped += int((~keep).sum())
            r.boxes, r.labels = boxes[keep], np.asarray(r.labels, np.int64)[keep]
            r.difficult = np.asarray(r.difficult, bool)[keep] if len(r.difficult) else np.zeros(len(r.boxes), bool)
            r.iscrowd = np.asarray(r.iscrowd, bool)[keep] if len(r.iscrowd) else np.zeros(len(r.boxes), bool)
            if r.area is not None:
                r.area = np.asarray(r.area, np.float64)[keep]
        if clipped or dropped:
            log.warning("%s: clipped %s, dropped %s", source, _count(clipped, "box"),
                        _count(dropped, "degenerate box"))
        # A proposal source ``get(index) -> (M, 4)`` boxes in original coordinates (a selective-search cache),
        # attached by the trainer for detectors that take precomputed proposals.
        self.proposals = None
        self._size_warned: set[str] = set()  # a mismatched image is reported once, not once per epoch
        self.train_indices = ([i for i, r in enumerate(records) if (~r.iscrowd).any()] if skip_empty else None)

    def __len__(self) -> int:
        return len(self.records)

    def image_info(self, index: int) -> dict:
        """``{"id", "file_name" (the image's path), "height", "width"}`` as the annotation file states them."""
        r = self.records[index]
        return {"id": r.id, "file_name": r.file_name, "height": r.height, "width": r.width}

    def annotations(self, index: int) -> dict:
        """The sanitised annotations of image ``index`` without reading the image: ``boxes (N, 4)`` float32
        xyxy, ``labels (N,)`` int64 in 1..K, ``difficult``/``iscrowd (N,)`` bool (crowd regions included)."""
        r = self.records[index]
        return {"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult, "iscrowd": r.iscrowd}

    def missing_image_files(self) -> list[tuple[int, str, str]]:
        """``(image id, file, reason)`` of each image whose file is missing, not a file or empty: one ``stat``
        per image, nothing decoded (cheap enough to run before training)."""
        missing = []
        for r in self.records:
            try:
                info = os.stat(r.file_name)
            except OSError as exc:
                missing.append((r.id, r.file_name, "not found" if isinstance(exc, FileNotFoundError)
                                else f"cannot be read ({exc.strerror or exc})"))
                continue
            if not stat.S_ISREG(info.st_mode):
                missing.append((r.id, r.file_name, "not a file"))
            elif info.st_size == 0:
                missing.append((r.id, r.file_name, "empty"))
        return missing

    def __getitem__(self, index: int):
        r = self.records[index]
        try:
            image = read_image(r.file_name)
        except ImageReadError as exc:  # the file is in the message already; add which entry of the dataset
            raise ImageReadError(f"image id {r.id} of {self.source}: {exc}") from None
        h, w = image.shape[:2]
        boxes, labels, difficult = r.boxes, r.labels, r.difficult
        if (h, w) != (r.height, r.width):
            if r.file_name not in self._size_warned:
                self._size_warned.add(r.file_name)
                log.warning("%s: image is %dx%d (WxH) but %s says %dx%d; boxes are clipped to the real size, "
                            "not rescaled", r.file_name, w, h, self.source, r.width, r.height)
            boxes, _, keep = sanitize_boxes(boxes, h, w)
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
            crowd = r.iscrowd[keep]
        else:
            crowd = r.iscrowd
        boxes, labels, difficult = boxes[~crowd], labels[~crowd], difficult[~crowd]
        proposals = None
        if self.proposals is not None:
            proposals, _, keep = sanitize_boxes(np.asarray(self.proposals.get(index), np.float32).reshape(-1, 4), h, w)
            proposals = proposals[keep]
        if self.transform is not None:
            if proposals is None:
                image, boxes, labels, extra = self.transform(image, boxes, labels, {"difficult": difficult})
            else:
                # Proposals travel through the same (box-aware) augmentation as the objects, flagged.
                n = len(boxes)
                image, boxes, labels, extra = self.transform(
                    image, np.concatenate([boxes, proposals]), np.concatenate([labels, np.zeros(len(proposals), np.int64)]),
                    {"difficult": np.concatenate([difficult, np.zeros(len(proposals), bool)]),
                     "proposal": np.arange(n + len(proposals)) >= n})
                is_prop = np.asarray(extra["proposal"], bool)
                proposals = np.asarray(boxes, np.float32).reshape(-1, 4)[is_prop]
                boxes, labels = np.asarray(boxes).reshape(-1, 4)[~is_prop], np.asarray(labels)[~is_prop]
                extra = {"difficult": np.asarray(extra["difficult"])[~is_prop]}
            difficult = extra["difficult"]
        target = {
            "boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, np.int64)),
            "difficult": torch.as_tensor(np.asarray(difficult, bool)),
            "iscrowd": torch.zeros(len(labels), dtype=torch.bool),
            "image_id": r.id,
            "orig_size": (h, w),
            "file_name": r.file_name,
        }
        if proposals is not None:
            target["proposals"] = torch.as_tensor(np.asarray(proposals, np.float32).reshape(-1, 4))
        return image, target

    def to_coco(self) -> dict:
        """Ground truth as a COCO dict (original category ids; VOC ``difficult`` objects as crowd regions,
        which the COCO metric neither rewards nor penalises). ``area`` is the source's own where it has one
        (COCO's segment area, which decides small/medium/large), else the box area."""
        images, annotations = [], []
        ann_id = 1
        for r in self.records:
            images.append({"id": r.id, "file_name": os.path.basename(r.file_name), "height": r.height,
                           "width": r.width})
            areas = r.area if r.area is not None else np.full(len(r.boxes), np.nan)
            for box, label, diff, crowd, area in zip(r.boxes, r.labels, r.difficult, r.iscrowd, areas):
                x1, y1, x2, y2 = (float(v) for v in box)
                area = float(area) if np.isfinite(area) and area > 0 else (x2 - x1) * (y2 - y1)
                annotations.append({"id": ann_id, "image_id": r.id, "category_id": self.cat_ids[int(label) - 1],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area,
                                    "iscrowd": int(bool(crowd) or bool(diff))})
                ann_id += 1
        categories = [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}
