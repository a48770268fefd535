"""Cutting a detection dataset of large images into a dataset of overlapping tiles at native resolution.

A detector trained on images resized to its input never sees the small objects of a 4000 px aerial or
microscopy image at their own scale, and tiled inference (``detkit.models.tiling``) shows it exactly that
scale. This module makes the matching training (or evaluation) data: every image is cut into the windows of
:func:`tile_grid` (the grid tiled inference runs on too), each box is clipped to each window it overlaps and
kept in that tile when at least ``min_visibility`` of its area lies inside, as the image splitter of the DOTA
devkit does (DOTA, Xia et al. 2018: aerial images of 4000 px cut into 1024 px patches; it keeps a cut object
when more than 0.7 of it remains). With tiles overlapping by at least an object's size, every such object lies
whole in some tile. The tiles are written as a COCO or VOC dataset that ``build_dataset`` reads back; one
source image is in memory at a time, and the dataset appears under its name only when complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from detkit.config import ConfigError
from detkit.data.voc import annotation_xml
from detkit.engine.files import replace_directory, write_text_atomic

#: Half an object is still recognisable as its class, and its clipped box is the visible part; a smaller
#: piece (a half circle may be a square's corner) teaches the detector to fire on fragments, which become
#: duplicate partial boxes at tile seams in tiled inference. An object cut below this lies whole (or mostly)
#: in a neighbouring tile when the overlap is at least its size.
DEFAULT_MIN_VISIBILITY = 0.5
MIN_TILE_SIZE = 32


#: windows one image may be cut into: a tiling past it (a 1 px window, an overlap of 0.999) is refused by count
MAX_WINDOWS = 10_000


class TooManyWindows(ValueError):
    """A tiling that would cut one image into more than :data:`MAX_WINDOWS` windows (the message says how many)."""


def _axis_count(length: int, size: int, overlap: float) -> int:
    """How many windows :func:`axis_starts` places along an axis of ``length``."""
    if length <= size:
        return 1
    stride = max(1, int(math.floor(size * (1.0 - overlap))))
    return int(math.ceil((length - size) / stride)) + 1


def axis_starts(length: int, size: int, overlap: float) -> Tensor:
    """Start offsets of windows of ``size`` along an axis of ``length`` pixels, consecutive windows sharing
    at least ``overlap`` of ``size``: the fewest windows that do, spread evenly from 0 to ``length - size``
    (so the last ends at the border; a shorter axis: one window at 0)."""
    if length <= size:
        return torch.zeros(1, dtype=torch.int64)
    count = _axis_count(length, size, overlap)
    return torch.linspace(0, length - size, count, dtype=torch.float64).floor().to(torch.int64)


def window_count(height: int, width: int, size: int, overlap: float) -> int:
    """How many windows :func:`tile_grid` cuts an image of ``height x width`` into, counted without cutting."""
    return _axis_count(height, size, overlap) * _axis_count(width, size, overlap)


def tile_grid(height: int, width: int, size: int, overlap: float, max_windows: int | None = MAX_WINDOWS) -> Tensor:
    """Windows ``(T, 4)`` int64 xyxy covering an image of ``height x width``, row-major, each ``size x size``
    (or the image's side where it is shorter), neighbours overlapping by at least ``overlap * size``.
    :class:`TooManyWindows` past ``max_windows`` (None: no limit), before anything is allocated."""
    if size < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile size {size} must be >= 1 and overlap {overlap} in [0, 1)")
    count = window_count(height, width, size, overlap)
    if max_windows is not None and count > max_windows:
        raise TooManyWindows(f"a {width}x{height} image in {size} px windows sharing {overlap:g} of a side makes "
                             f"{count:,} windows, more than the {max_windows:,} one image may have")
    ys, xs = axis_starts(height, size, overlap), axis_starts(width, size, overlap)
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.reshape(-1), x0.reshape(-1)
    return torch.stack([x0, y0, (x0 + size).clamp(max=width), (y0 + size).clamp(max=height)], dim=1)


@dataclass(frozen=True)
class TileSpec:
    """How images are cut: ``size`` x ``size`` windows sharing at least ``overlap`` of a side
    (:func:`tile_grid`), boxes kept where at least ``min_visibility`` of their area is inside, and
    the fraction ``keep_empty`` of the tiles without a kept box written anyway.

    Raises ConfigError on construction, naming the option (as ``detkit data tile`` spells it), its value and
    what it expects.
    """

    size: int
    overlap: float
    min_visibility: float = DEFAULT_MIN_VISIBILITY
    keep_empty: float = 0.0

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < MIN_TILE_SIZE:
            raise ConfigError(f"--size {self.size!r}: expected a tile side in pixels, an integer >= {MIN_TILE_SIZE}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"--overlap {self.overlap!r}: expected the fraction of a tile that neighbours share, "
                              f"in [0, 1)")
        if not 0.0 < self.min_visibility <= 1.0:
            raise ConfigError(f"--min-visibility {self.min_visibility!r}: expected the fraction of a box's area "
                              f"that must lie inside a tile for the tile to keep it, in (0, 1]")
        if not 0.0 <= self.keep_empty <= 1.0:
            raise ConfigError(f"--keep-empty {self.keep_empty!r}: expected the fraction of the tiles without "
                              f"objects to keep, in [0, 1]")


def window_boxes(boxes: np.ndarray, window, min_visibility: float,
                 always: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The boxes a tile keeps: ``boxes (N, 4)`` xyxy in image pixels, ``window (x0, y0, x1, y1)``.

    Returns ``(clipped (K, 4) float32 in window pixels, keep (N,) bool)``: a box is kept when its area inside
    the window is at least ``min_visibility`` of its whole area, or, where ``always`` (N,) is True (crowd
    regions, which mark where detections are neither right nor wrong), when any of it is inside.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x0, y0, x1, y1 = (float(v) for v in window)
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], x0, x1)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], y0, y1)
    inside = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (inside > 0) & (inside >= min_visibility * area - 1e-6 * area)  # (a float32 margin at exactly 1)
    if always is not None:
        keep |= (inside > 0) & np.asarray(always, bool)
    return clipped[keep] - np.array([x0, y0, x0, y0], np.float32), keep


def _write_png(path: str, image_rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    buf.tofile(path)


class _CocoWriter:
    """``images/<tile>.png`` and, at the end, ``annotations.json`` with the source's category ids and names;
    each image entry also names its source image and window (``source_id``, ``source_file``, ``window``), so
    tile detections can be mapped back."""

    def __init__(self, root: str, class_names: list[str], cat_ids: list[int]):
        self.root, self.cat_ids = root, list(cat_ids)
        self.categories = [{"id": c, "name": n} for c, n in zip(cat_ids, class_names)]
        self.images, self.annotations = [], []
        os.makedirs(os.path.join(root, "images"))

    def add(self, name: str, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, ignored: np.ndarray,
            source: dict) -> None:
        _write_png(os.path.join(self.root, "images", name + ".png"), image)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": name + ".png", "height": image.shape[0],
                            "width": image.shape[1], **source})
        for box, label, flag in zip(boxes, labels, ignored):
            x1, y1, x2, y2 = (float(v) for v in box)
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                     "category_id": self.cat_ids[int(label) - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                     "area": (x2 - x1) * (y2 - y1), "iscrowd": int(flag)})

    def finish(self) -> None:
        with open(os.path.join(self.root, "annotations.json"), "w", encoding="utf-8") as f:
            json.dump({"images": self.images, "annotations": self.annotations, "categories": self.categories}, f)


class _VocWriter:
    """``JPEGImages/<tile>.png``, ``Annotations/<tile>.xml`` (1-based pixel coordinates, rounded to whole
    pixels) and, at the end, ``ImageSets/Main/<split>.txt`` listing every tile."""

    def __init__(self, root: str, class_names: list[str], split: str):
        self.root, self.class_names, self.split = root, list(class_names), split
        self.names = []
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(root, sub))

    def add(self, name: str, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, ignored: np.ndarray,
            source: dict) -> None:
        _write_png(os.path.join(self.root, "JPEGImages", name + ".png"), image)
        xml, _, _ = annotation_xml(name + ".png", image.shape[0], image.shape[1], self.class_names, boxes, labels,
                                   ignored, extra={"source_image": source["source_file"]})
        write_text_atomic(os.path.join(self.root, "Annotations", name + ".xml"), xml)
        self.names.append(name)

    def finish(self) -> None:
        write_text_atomic(os.path.join(self.root, "ImageSets", "Main", f"{self.split}.txt"),
                          "".join(n + "\n" for n in self.names))


def _check_out(out_dir: str, overwrite: bool, dataset) -> None:
    """Refuse, before any work, a non-empty ``out_dir`` without ``overwrite``, an ``out_dir`` that holds the
    source images (overwriting would delete them) and one this process cannot create or write."""
    from detkit.data.media import check_output_dir

    out = os.path.abspath(out_dir)
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(f"--output {out_dir}: the folder is not empty; give an empty or new folder, or "
                              f"--overwrite to replace what is there")
        for index in range(len(dataset)):
            path = os.path.abspath(dataset.image_info(index)["file_name"])
            if path.startswith(out + os.sep):
                raise ConfigError(f"--output {out_dir}: holds the source image {path}; --overwrite would delete it "
                                  f"(write the tiles elsewhere)")
    check_output_dir(out, "--output")


def _tile_stem(info: dict, used: set[str]) -> str:
    """The source image's file stem, or ``<stem>-<image id>`` when another source image had that stem."""
    stem = os.path.splitext(os.path.basename(info["file_name"]))[0]
    if stem in used:
        stem = f"{stem}-{info['id']}"
    used.add(stem)
    return stem


def _tile_image(writer, image: np.ndarray, ann: dict, index: int, stem: str, info: dict, spec: TileSpec,
                counts: dict) -> None:
    """Write the tiles of one source image and count them, their boxes and the boxes no tile kept into
    ``counts``."""
    ignored = ann["iscrowd"] | ann["difficult"]
    seen = np.zeros(len(ann["boxes"]), bool)
    try:
        windows = tile_grid(image.shape[0], image.shape[1], spec.size, spec.overlap)
    except TooManyWindows as exc:
        raise ConfigError(f"image {info['id']} ({info['file_name']}): {exc}: use a larger --size or a smaller "
                          f"--overlap") from None
    for t, window in enumerate(windows.tolist()):
        boxes, keep = window_boxes(ann["boxes"], window, spec.min_visibility, always=ann["iscrowd"])
        seen |= keep
        if not keep.any():
            counts["empty_tiles"] += 1
            if spec.keep_empty == 0 or np.random.default_rng([index, t]).random() >= spec.keep_empty:
                counts["skipped_empty"] += 1
                continue
        x0, y0, x1, y1 = window
        source = {"source_id": info["id"], "source_file": os.path.basename(info["file_name"]),
                  "window": [x0, y0, x1, y1]}
        writer.add(f"{stem}_x{x0}_y{y0}", np.ascontiguousarray(image[y0:y1, x0:x1]), boxes, ann["labels"][keep],
                   ignored[keep], source)
        counts["tiles"] += 1
        counts["boxes"] += int(keep.sum())
    counts["objects"] += len(seen)
    counts["lost"] += int((~seen).sum())


def tile_dataset(dataset, out_dir: str, spec: TileSpec, fmt: str = "coco", split: str = "trainval",
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Write the tiles of every image of ``dataset`` (a ``DetectionDataset``) to ``out_dir`` as a ``fmt``
    (``coco``/``voc``; VOC's split file is ``<split>.txt``) dataset; tile files are
    ``<source stem>_x<x0>_y<y0>.png``.

    Windows are ``tile_grid(height, width, spec.size, spec.overlap)``; boxes are kept as :func:`window_boxes`
    says (crowd regions whenever they overlap the tile), with their crowd (COCO) or difficult (VOC) flag; a VOC
    output marks crowd regions difficult and a COCO output marks difficult objects crowd, as ``to_coco`` does. A
    tile without a kept box is written with probability ``spec.keep_empty`` (a draw seeded by image index and
    tile index, so the choice is reproducible). Everything is written into a hidden folder beside ``out_dir``,
    renamed onto it when complete (replacing a non-empty ``out_dir`` only with ``overwrite``). Returns
    ``{"images", "tiles", "empty_tiles", "skipped_empty", "objects", "boxes", "lost", "format", "out"}``:
    ``objects`` counts source boxes, ``boxes`` the kept (box, tile) pairs, ``lost`` the source boxes no tile
    kept.
    """
    from detkit.data.images import read_image

    if fmt not in ("coco", "voc"):
        raise ConfigError(f"--format {fmt!r}: expected 'coco' or 'voc'")
    _check_out(out_dir, overwrite, dataset)
    out = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex[:12]}.partial")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.mkdir(tmp)
    counts = {"images": len(dataset), "tiles": 0, "empty_tiles": 0, "skipped_empty": 0, "objects": 0, "boxes": 0,
              "lost": 0}
    try:
        writer = (_CocoWriter(tmp, dataset.class_names, dataset.cat_ids) if fmt == "coco"
                  else _VocWriter(tmp, dataset.class_names, split))
        used: set[str] = set()
        indices = range(len(dataset))
        if progress:
            from detkit.engine.progress import progress_bar

            indices = progress_bar(indices, desc="tile", unit="image")
        for index in indices:
            info = dataset.image_info(index)
            image = read_image(info["file_name"])  # its real size decides the grid; boxes are clipped to it
            _tile_image(writer, image, dataset.annotations(index), index, _tile_stem(info, used), info, spec, counts)
        writer.finish()
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**counts, "format": fmt, "out": out_dir}
