"""What a detection dataset holds, told before anyone trains on it (``detkit data check``).

The count of images and of boxes per class, the images without objects (training skips them), a histogram of
box sizes (the square root of the area, in the image's pixels and at the network's input) set beside the
RPN's anchor sizes (Faster R-CNN, Sec. 3.1.1: anchors of 128, 256 and 512 px at an input whose shorter side is
600 px; an object much smaller than the smallest anchor overlaps none of them well), and the problems found:
what the reader reported while reading (boxes clipped, degenerate boxes dropped, repeated label lines), missing
or empty image files, image headers that disagree with the annotations, and images listed twice or stored
twice. Nothing is decoded: image headers are read, and files are hashed only where two have the same size.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: bucket edges of the box-size histogram: sqrt(area) in pixels
SIZE_EDGES = (16, 32, 64, 128, 256, 512)
#: examples a problem lists (the count says how many there are)
EXAMPLES = 20


@dataclass(frozen=True)
class AnchorScale:
    """The anchors boxes are compared with: ``sizes`` (sqrt(area), pixels at the network input), where they
    come from (``source``), and ``scale(height, width)``, the factor an image of that size is resized by
    before the network sees it (``input`` says how, in words)."""

    sizes: tuple[float, ...]
    source: str
    scale: Callable[[int, int], float]
    input: str


def bucket_labels(edges: tuple[int, ...] = SIZE_EDGES) -> list[str]:
    """``["<16", "16-32", ..., ">=512"]`` for ``edges``."""
    return [f"<{edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f">={edges[-1]}"]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def read_reporting(build: Callable[[], object]) -> tuple[object, list[str]]:
    """``build()`` (a dataset reader) and the warnings it logged or raised while reading: what the reader
    counted and reported (clipped and dropped boxes, repeated lines, ...). They are collected here instead of
    being printed, so that the summary lists them once."""
    root = logging.getLogger()
    collect, handlers, level = _Collect(), root.handlers[:], root.level
    root.handlers = [collect]
    root.setLevel(min(level, logging.WARNING) if level else logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = build()
    finally:
        root.handlers, root.level = handlers, level
    return dataset, collect.messages + [str(w.message) for w in caught]


def _problem(kind: str, message: str, examples: list[str] | None = None, count: int | None = None) -> dict:
    examples = examples or []
    return {"kind": kind, "count": len(examples) if count is None else count, "message": message,
            "examples": examples[:EXAMPLES]}


def _header_sizes(dataset, skip: set[int]) -> tuple[list[str], list[str]]:
    """Images (other than ``skip``) whose header gives another size than the annotations, and images whose
    header Pillow cannot read."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # only the header is read; read_image applies detkit's own limit
    mismatched, unreadable = [], []
    for index in range(len(dataset)):
        if index in skip:
            continue
        info = dataset.image_info(index)
        try:
            with Image.open(info["file_name"]) as header:
                width, height = header.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            unreadable.append(f"image id {info['id']}: {info['file_name']} ({exc})")
            continue
        if (height, width) != (info["height"], info["width"]):
            mismatched.append(f"image id {info['id']}: {info['file_name']} is {width}x{height} (WxH), the "
                              f"annotations say {info['width']}x{info['height']}")
    return mismatched, unreadable


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def duplicate_images(dataset, skip: set[int] = frozenset()) -> tuple[list[list[int]], list[list[int]]]:
    """Indices of images listed more than once (one file, several entries) and of files stored more than once
    (the same bytes under several names): lists of index groups. Only files of equal size are hashed."""
    by_path: dict[str, list[int]] = defaultdict(list)
    for index in range(len(dataset)):
        if index not in skip:
            by_path[os.path.realpath(dataset.image_info(index)["file_name"])].append(index)
    listed = [group for group in by_path.values() if len(group) > 1]
    by_size: dict[int, list[str]] = defaultdict(list)
    for path in by_path:
        by_size[os.path.getsize(path)].append(path)
    stored = []
    for paths in by_size.values():
        if len(paths) < 2:
            continue
        by_digest: dict[str, list[str]] = defaultdict(list)
        for path in paths:
            by_digest[_digest(path)].append(path)
        stored += [sorted(i for p in same for i in by_path[p]) for same in by_digest.values() if len(same) > 1]
    return listed, stored


def _file_problems(dataset) -> list[dict]:
    """Missing or empty files, headers that disagree with the annotations, duplicates."""
    problems = []
    check = getattr(dataset, "missing_image_files", None)
    missing = check() if check is not None else []
    if missing:
        problems.append(_problem("missing_image", f"image files missing or empty (training refuses to "
                                 f"start): {len(missing)}", [f"image id {i}: {p} ({why})" for i, p, why in missing]))
    ids = {dataset.image_info(k)["id"]: k for k in range(len(dataset))}
    skip = {ids[i] for i, _, _ in missing if i in ids}
    mismatched, unreadable = _header_sizes(dataset, skip)
    if mismatched:
        problems.append(_problem("size_mismatch", f"images not of the size their annotations give (boxes "
                                 f"are clipped to the real size, not rescaled): {len(mismatched)}", mismatched))
    if unreadable:
        problems.append(_problem("unreadable_header", f"images whose header cannot be read (they may not "
                                 f"decode): {len(unreadable)}", unreadable))
    listed, stored = duplicate_images(dataset, skip)

    def names(group):
        return " = ".join(f"image id {dataset.image_info(k)['id']} ({dataset.image_info(k)['file_name']})"
                          for k in group)

    if listed:
        problems.append(_problem("listed_twice", f"image files listed more than once: {len(listed)} "
                                 f"({sum(map(len, listed))} entries)", [names(g) for g in listed]))
    if stored:
        problems.append(_problem("duplicate_image", f"images stored more than once under other names "
                                 f"(identical bytes): {len(stored)} ({sum(map(len, stored))} files)",
                                 [names(g) for g in stored]))
    return problems


def _anchor_section(anchors: AnchorScale, sizes: np.ndarray, scales: np.ndarray, edges: tuple[int, ...]) -> dict:
    at_input = sizes * scales
    ranges = list(zip((0, *edges), (*edges, float("inf"))))
    smallest, largest = min(anchors.sizes), max(anchors.sizes)
    return {
        "sizes": list(anchors.sizes), "source": anchors.source, "input": anchors.input,
        "at_input": np.histogram(at_input, bins=[0, *edges, np.inf])[0].tolist(),
        "per_bucket": [[a for a in anchors.sizes if lo <= a < hi] for lo, hi in ranges],
        "below_half_smallest": int((at_input < smallest / 2).sum()),
        "above_twice_largest": int((at_input > largest * 2).sum()),
    }


def summarize(dataset, anchors: AnchorScale | None = None, read_warnings: list[str] | None = None,
              edges: tuple[int, ...] = SIZE_EDGES) -> dict:
    """The summary of ``dataset`` (a :class:`~detkit.data.dataset.DetectionDataset`) as plain data: ``images``,
    ``boxes``, ``classes`` (per class: ``label``, ``name``, ``boxes``, ``images``), ``crowd`` and ``difficult``
    boxes, ``images_without_objects``, ``box_sizes`` (``buckets``: labels, ``image``: boxes per bucket of
    sqrt(area) in the image's pixels), ``anchors`` (with ``anchors``: the same boxes at the network input, the
    anchor sizes in each bucket, and how many boxes are below half the smallest anchor or above twice the
    largest) and ``problems`` (``kind``, ``count``, ``message``, ``examples``), the reader's ``read_warnings``
    first. Crowd regions are counted apart and left out of the sizes (they are no training targets)."""
    names = list(dataset.class_names)
    boxes_per_class = np.zeros(len(names), np.int64)
    images_per_class = np.zeros(len(names), np.int64)
    sizes, scales = [], []
    crowd = difficult = empty = 0
    for index in range(len(dataset)):
        ann, info = dataset.annotations(index), dataset.image_info(index)
        is_crowd = np.asarray(ann["iscrowd"], bool)
        crowd += int(is_crowd.sum())
        difficult += int((np.asarray(ann["difficult"], bool) & ~is_crowd).sum())
        boxes = np.asarray(ann["boxes"], np.float64).reshape(-1, 4)[~is_crowd]
        labels = np.asarray(ann["labels"], np.int64)[~is_crowd]
        if not len(labels):
            empty += 1
            continue
        boxes_per_class += np.bincount(labels - 1, minlength=len(names))
        images_per_class[np.unique(labels - 1)] += 1
        sizes.append(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        if anchors is not None:
            scales.append(np.full(len(boxes), anchors.scale(info["height"], info["width"])))
    sizes = np.concatenate(sizes) if sizes else np.zeros(0)
    cat_ids = list(getattr(dataset, "cat_ids", range(1, len(names) + 1)))
    summary = {
        "dataset": str(getattr(dataset, "source", "")), "images": len(dataset), "boxes": int(len(sizes)),
        "classes": [{"label": k + 1, "name": n, "category_id": int(cat_ids[k]), "boxes": int(boxes_per_class[k]),
                     "images": int(images_per_class[k])} for k, n in enumerate(names)],
        "crowd": crowd, "difficult": difficult, "images_without_objects": empty,
        "box_sizes": {"unit": "sqrt(area) in pixels", "buckets": bucket_labels(edges),
                      "image": np.histogram(sizes, bins=[0, *edges, np.inf])[0].tolist(),
                      "min": float(sizes.min()) if len(sizes) else None,
                      "median": float(np.median(sizes)) if len(sizes) else None,
                      "max": float(sizes.max()) if len(sizes) else None},
        "anchors": (_anchor_section(anchors, sizes, np.concatenate(scales) if scales else np.zeros(0), edges)
                    if anchors is not None else None),
    }
    problems = [_problem("reader", message, count=1) for message in read_warnings or []]
    unused = [n for n, count in zip(names, boxes_per_class) if count == 0]
    if unused:
        problems.append(_problem("class_without_boxes", f"classes without boxes (the model learns nothing of "
                                 f"them): {len(unused)}", unused))
    summary["problems"] = problems + _file_problems(dataset)
    return summary


def _share(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.0f}%)" if total else str(n)


def format_summary(summary: dict) -> str:
    """The summary as text for a terminal."""
    lines = [f"dataset: {summary['dataset']}",
             f"images: {summary['images']}, of which {summary['images_without_objects']} without objects",
             f"boxes: {summary['boxes']} in {len(summary['classes'])} classes"
             + (f" (and {summary['crowd']} crowd regions, not training targets)" if summary["crowd"] else "")
             + (f"; {summary['difficult']} of them difficult" if summary["difficult"] else "")]
    width = max(8, *(len(c["name"]) for c in summary["classes"]))
    lines.append(f"  {'label':>5}  {'class':<{width}}  {'boxes':>7}  {'images':>7}")
    lines += [f"  {c['label']:>5}  {c['name']:<{width}}  {c['boxes']:>7}  {c['images']:>7}" for c in summary["classes"]]
    sizes, anchors = summary["box_sizes"], summary["anchors"]
    total = summary["boxes"]
    lines.append("box sizes, sqrt(area) in pixels" + (
        f" (median {sizes['median']:.1f}, from {sizes['min']:.1f} to {sizes['max']:.1f})" if total else ""))
    if anchors is None:
        lines.append(f"  {'size':<9}  {'image':>12}")
        lines += [f"  {b:<9}  {_share(n, total):>12}" for b, n in zip(sizes["buckets"], sizes["image"])]
    else:
        lines.append(f"  {'size':<9}  {'image':>12}  {'input':>12}  anchors")
        lines += [f"  {b:<9}  {_share(n, total):>12}  {_share(m, total):>12}  {', '.join(f'{a:g}' for a in per)}"
                  for b, n, m, per in zip(sizes["buckets"], sizes["image"], anchors["at_input"], anchors["per_bucket"])]
        lines.append(f"anchors {', '.join(f'{a:g}' for a in anchors['sizes'])} px ({anchors['source']}); input: "
                     f"{anchors['input']}")
        smallest, largest = min(anchors["sizes"]), max(anchors["sizes"])
        lines.append(f"  at the input, {_share(anchors['below_half_smallest'], total)} boxes are smaller than half "
                     f"the smallest anchor ({smallest / 2:g} px) and {_share(anchors['above_twice_largest'], total)} "
                     f"larger than twice the largest ({largest * 2:g} px)")
    problems = summary["problems"]
    lines.append(f"problems: {len(problems) or 'none'}")
    for p in problems:
        lines.append(f"  - {p['message']}")
        shown = p["examples"] if p["kind"] != "reader" else []
        lines += [f"      {e}" for e in shown[:5]]
        if len(shown) > 5 or p["count"] > max(5, len(shown)):
            lines.append(f"      ... and {p['count'] - min(5, len(shown))} more")
    return "\n".join(lines)
