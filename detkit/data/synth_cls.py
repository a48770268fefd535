"""The classification counterpart of the synthetic detection dataset, for pretraining a backbone as a classifier.

R-CNN (Girshick et al., 2014, section 2.3) pretrains its CNN on image classification before fine-tuning it on
warped region proposals. Here the pretraining images are what a detector's region of the synthetic dataset
looks like: one object of the labelled class roughly centred (its centre up to 15% of the side away from the
middle), its long side 40-85% of the crop side, aspect ratio 1:2 to 2:1, slightly rotated, colour-jittered and
15% of the time in another class's colour (so colour alone does not decide the class), on a window of one of
``detkit.data.synth``'s textured backgrounds with its distractor outlines, drawn at the detection images' size
(so the clutter is as dense as a region of a detection image shows it). Around it: 0-2 smaller objects of other classes
cut by the crop border and behind it (the neighbours a loose proposal catches), and occluder blobs drawn over
it (0-3, the detection images' sizes), redrawn or reduced until at least 60% of its pixels stay visible. The output is an ImageFolder tree
(``train/<class>/00000.png``, ``val/<class>/00000.png``) that torchvision's ``ImageFolder`` reads as is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import cv2
import numpy as np

from detkit.data.synth import (CLASSES, SWAPPED_COLOUR, VARIANTS, SynthVariant, _background, _distractor_outlines,
                               _jitter, _place, _polygon_pixels, _write_png)

SUMMARY = "synth_cls.json"
SPLITS = ("train", "val")  # the split's index here is its id in each image's seed
MIN_VISIBLE = 0.6  # of the main object's pixels inside the crop, after the occluders

# The layout of a crop, in synth.py's terms; sizes are fractions of the crop side, counts ``[low, high)``.
# object_scale: the main object's long side; objects: the neighbours of other classes; centre_margin: the main
# object's centre stays this far from the border (0.35: up to 15% from the middle); min_pixels: a neighbour with
# fewer pixels inside the crop is not drawn; occluders are drawn over the main object. Every crop has its
# object, so ``empty`` is 0.
# The occluders are those of the detection images (0-3, 3-12% of the side) but centred on the object.
CROP = SynthVariant(object_scale=(0.4, 0.85), objects=(0, 3), empty=0.0, centre_margin=0.35, min_pixels=12,
                    outline_scale=(0.2, 0.6), outlines=(0, 3), occluder_scale=(0.03, 0.12), occluders=(0, 4))
# A crop's background is a window of a detection image's background (240x320, its distractor outlines
# included), as a region proposal sees it: clutter as dense as in the detection data, not a whole image's
# clutter squeezed into one crop. WINDOW: the window's side in pixels of that image, resized to the crop.
BACKGROUND = (240, 320)
WINDOW = (64, 193)
NEIGHBOUR_SCALE = (0.4, 0.8)  # a neighbour's size as a fraction of the main object's long side
NEIGHBOUR_DEPTH = (-0.15, 0.1)  # how far inside the border a neighbour's centre lies (negative: outside)


def _colour_of(swap_rng: np.random.Generator, label: int) -> int:
    """The class whose colour an object wears: its own, or with probability SWAPPED_COLOUR another one."""
    if swap_rng.random() < SWAPPED_COLOUR:
        return (label + int(swap_rng.integers(1, len(CLASSES)))) % len(CLASSES)
    return label


def _paint(rng: np.random.Generator, img: np.ndarray, ys: np.ndarray, xs: np.ndarray, colour_of: int) -> None:
    """Fill the pixels ``(ys, xs)`` with a jittered class colour and a little shading, as synth.render does."""
    colour = np.array(_jitter(rng, colour_of), np.float32)
    shade = 1.0 + rng.normal(0, 0.06, (len(ys), 1))
    img[ys, xs] = np.clip(colour[None, :] * shade, 0, 255).astype(np.uint8)


def _neighbours(rng: np.random.Generator, swap_rng: np.random.Generator, img: np.ndarray, label: int,
                main_long: float) -> None:
    """Draw 0-2 smaller objects of classes other than ``label``, centred near a random border so that the
    crop cuts them; they are drawn before the main object, which therefore hides them where they overlap."""
    size = img.shape[0]
    for _ in range(rng.integers(*CROP.objects)):
        other = (label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
        s = main_long * rng.uniform(*NEIGHBOUR_SCALE)
        ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        along, depth = rng.uniform(0, size), rng.uniform(*NEIGHBOUR_DEPTH) * size
        cx, cy = ((depth, along), (size - depth, along), (along, depth), (along, size - depth))[rng.integers(4)]
        pts = _place(CLASSES[other], cx, cy, s * np.sqrt(ratio), s / np.sqrt(ratio), rng.uniform(-0.25, 0.25))
        ys, xs = _polygon_pixels(pts, size, size)
        if len(ys) >= CROP.min_pixels:
            _paint(rng, img, ys, xs, _colour_of(swap_rng, other))


def _occlude(rng: np.random.Generator, img: np.ndarray, shape: np.ndarray, box: tuple[float, float, float, float]
             ) -> np.ndarray:
    """Draw occluder ellipses centred inside ``box`` (x1, y1, x2, y2 of the main object) over ``img`` in place
    and return the visible part of ``shape`` (bool (S, S)).

    A draw that hides more than 1 - MIN_VISIBLE of the object is thrown away and redrawn, with one occluder
    fewer every second try; when even one occluder hides too much twice, there are none.
    """
    size = img.shape[0]
    n = int(rng.integers(*CROP.occluders))
    area = int(shape.sum())
    for attempt in range(2 * n):
        canvas, hidden = img.copy(), np.zeros(shape.shape, np.uint8)
        for _ in range(n - attempt // 2):
            colour = tuple(int(v) for v in rng.uniform(30, 200, 3))
            centre = (int(rng.uniform(box[0], box[2])), int(rng.uniform(box[1], box[3])))
            axes = tuple(int(v) for v in rng.uniform(*CROP.occluder_scale, 2) * size)
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(canvas, centre, axes, angle, 0, 360, colour, -1)
            cv2.ellipse(hidden, centre, axes, angle, 0, 360, 1, -1)
        visible = shape & (hidden == 0)
        if visible.sum() >= MIN_VISIBLE * area:
            img[:] = canvas
            return visible
    return shape.copy()


def _background_window(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random ``WINDOW``-sided window of a detection-sized background, resized to ``size`` x ``size``."""
    canvas = _background(rng, *BACKGROUND)
    _distractor_outlines(rng, canvas, VARIANTS["default"])
    side = int(rng.integers(*WINDOW))
    top, left = int(rng.integers(0, BACKGROUND[0] - side + 1)), int(rng.integers(0, BACKGROUND[1] - side + 1))
    shrink = side > size
    return cv2.resize(canvas[top:top + side, left:left + side], (size, size),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def render_crop(rng: np.random.Generator, swap_rng: np.random.Generator, label: int, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One classification image of class ``label`` (index into CLASSES).

    Returns ``image`` ((S, S, 3) uint8 RGB), ``shape`` ((S, S) bool, the main object's pixels inside the crop)
    and ``visible`` ((S, S) bool, those not covered by occluders; ``visible.sum() >= MIN_VISIBLE * shape.sum()``).
    ``rng`` draws the layout and ``swap_rng`` only the colour swaps, as in ``synth.render``.
    """
    img = _background_window(rng, size)
    long = rng.uniform(*CROP.object_scale) * size
    short = long / np.exp(rng.uniform(0, np.log(2.0)))
    ow, oh = (long, short) if rng.random() < 0.5 else (short, long)
    m = CROP.centre_margin
    cx, cy = rng.uniform(m * size, (1 - m) * size, 2)
    pts = _place(CLASSES[label], cx, cy, ow, oh, rng.uniform(-0.25, 0.25))
    colour_of = _colour_of(swap_rng, label)  # drawn first, so the neighbours' swaps do not change it
    _neighbours(rng, swap_rng, img, label, long)
    ys, xs = _polygon_pixels(pts, size, size)
    _paint(rng, img, ys, xs, colour_of)
    shape = np.zeros((size, size), bool)
    shape[ys, xs] = True
    visible = _occlude(rng, img, shape, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return img, shape, visible


def _check_arguments(per_class: int, val_per_class: int, seed: int, size: int) -> None:
    for name, value, low in (("per_class", per_class, 1), ("val_per_class", val_per_class, 0), ("seed", seed, 0),
                             ("size", size, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r}: expected an integer >= {low}")


def _check_out_dir(out_dir: str) -> None:
    """Refuse to write into anything but a new or empty directory or the output of an earlier run, before any
    image is drawn."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, SUMMARY)):
        raise ValueError(f"{out_dir}: directory is not empty and holds no {SUMMARY} from an earlier run; "
                         f"refusing to write into it (give a new or empty directory)")


def _render_split(split_dir: str, split_id: int, count: int, seed: int, size: int) -> None:
    """Write ``count`` images per class; image i of class c is drawn from ``default_rng([seed, split_id, c, i])``
    (its colour swaps from ``[..., i, 1]``), so a larger count keeps the first images byte-identical."""
    digits = max(5, len(str(count - 1)))  # zero-padded so that sorted names are in drawing order
    for c, name in enumerate(CLASSES):
        class_dir = os.path.join(split_dir, name)
        os.makedirs(class_dir)
        for i in range(count):
            img, _, _ = render_crop(np.random.default_rng([seed, split_id, c, i]),
                                    np.random.default_rng([seed, split_id, c, i, 1]), c, size)
            _write_png(os.path.join(class_dir, f"{i:0{digits}d}.png"), img)


def _move_into_place(staging: str, out_dir: str) -> None:
    """Swap the new trees and summary into ``out_dir``; the old trees go to ``staging``, which the caller
    deletes. Only renames happen here, so an interruption during the drawing leaves ``out_dir`` untouched, and
    files in ``out_dir`` other than the trees and the summary stay."""
    os.makedirs(out_dir, exist_ok=True)
    for split in SPLITS:
        target = os.path.join(out_dir, split)
        if os.path.lexists(target):
            os.rename(target, os.path.join(staging, f"old-{split}"))
        if os.path.isdir(os.path.join(staging, split)):
            os.rename(os.path.join(staging, split), target)
    os.replace(os.path.join(staging, SUMMARY), os.path.join(out_dir, SUMMARY))


def synthesize_classification(out_dir: str, per_class: int = 2000, val_per_class: int = 100, seed: int = 0,
                              size: int = 64) -> dict:
    """Write the ImageFolder tree ``out_dir/{train,val}/<class>/<index>.png`` of ``size`` x ``size`` RGB crops,
    ``per_class`` (``val_per_class``) per class of CLASSES, and ``out_dir/synth_cls.json``; return that summary:
    ``{"classes", "size", "seed", "per_class": {split: n}, "images": {split: n * 5}}``.

    With ``val_per_class=0`` no ``val/`` is written (torchvision's ImageFolder rejects empty class folders).
    ``out_dir`` must be new, empty, or hold the ``synth_cls.json`` of an earlier run, whose ``train/`` and
    ``val/`` are then replaced. The trees are drawn in a hidden sibling directory and renamed into place at the
    end. Byte-identical output for the same arguments.
    """
    _check_arguments(per_class, val_per_class, seed, size)
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    counts = dict(zip(SPLITS, (int(per_class), int(val_per_class))))
    summary = {"classes": list(CLASSES), "size": int(size), "seed": int(seed), "per_class": counts,
               "images": {split: n * len(CLASSES) for split, n in counts.items()}}
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        for split_id, (split, count) in enumerate(counts.items()):
            if count:
                _render_split(os.path.join(staging, split), split_id, count, int(seed), int(size))
        with open(os.path.join(staging, SUMMARY), "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
