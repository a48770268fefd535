"""The built-in synthetic detection dataset.

Five classes that differ in both shape and colour (red circle, green square,
blue triangle, yellow star, magenta cross), with colour jitter, and 15% of the
objects painted in another class's colour so that colour alone is not a
sufficient cue, at scales from 8% to 50% of the shorter image
side and aspect ratios from 1:2 to 2:1, slightly rotated, occluding each other
and occluded by clutter, on textured backgrounds (gradients, noise, lines and
blobs in distractor colours, including outlines of the object shapes in other
colours). An object is annotated when at least 40% of its pixels stay visible
(one more than 60% hidden by later objects or clutter is not); its box is the
tight box of its whole (amodal) shape, cut at the image border. About 5% of
the images have no objects. Output is deterministic for a seed (byte-identical
PNGs): 300 images of 240x320 take about 3 s on one core.

The ``small`` variant draws the same classes the same way, but 15-40 objects per image at 2.5% to 10% of the
shorter side (6-24 px at 240x320, nearly all "small" by COCO's area < 32^2), with outlines and occluders
scaled to match: the case where a Feature Pyramid Network should beat a detector on one coarse feature map.
A variant is data (``SynthVariant``), not branches in the renderer.

The ``scene`` variant (``detkit data synth --scene 4000x4000``) is a large image, many times a detector's
input, covered with objects of 24-64 px at the default variant's count per area (some 700 in 4000x4000) on the
same background: the images that tiled inference is for (resized whole to the input, their objects shrink to
a few pixels). Its layout depends on the image size (``SIZED_VARIANTS``). Noise and occluders are drawn in
bands and windows, so a 4000x4000 scene takes about 2 s and 130 MB (its image and owner map).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import cv2
import numpy as np

from detkit.engine.files import atomic_path, replace_directory, write_text_atomic

CLASSES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ((220, 40, 40), (40, 190, 60), (50, 70, 220), (235, 215, 40), (210, 50, 210))  # RGB
MIN_VISIBLE = 0.4
SWAPPED_COLOUR = 0.15  # fraction of objects in another class's colour
_BAND_VALUES = 1 << 20  # background noise values drawn at once (8 MiB of float64)


@dataclass(frozen=True)
class SynthVariant:
    """The layout knobs of one variant. Sizes are fractions of the shorter image side; counts are
    ``[low, high)`` ranges as ``Generator.integers`` draws them."""

    object_scale: tuple[float, float]  # sqrt of an object's unrotated box area
    objects: tuple[int, int]  # objects drawn per image, before the occlusion rule drops some
    empty: float  # fraction of the images without objects
    centre_margin: float  # object centres stay this fraction of the width (height) away from the border
    min_pixels: int  # an object with fewer pixels inside the image is not drawn
    outline_scale: tuple[float, float]  # distractor outlines of the object shapes
    outlines: tuple[int, int]
    occluder_scale: tuple[float, float]  # semi-axes of the clutter ellipses drawn over the objects
    occluders: tuple[int, int]
    lines: tuple[int, int] = (4, 12)  # background lines, each between two points anywhere in the image
    blobs: tuple[int, int] = (2, 7)  # background ellipses in muted colours
    blob_scale: tuple[float, float] = (0.03, 0.15)  # their semi-axes


VARIANTS = {
    "default": SynthVariant(object_scale=(0.08, 0.5), objects=(1, 7), empty=0.05, centre_margin=0.1, min_pixels=16,
                            outline_scale=(0.08, 0.3), outlines=(0, 3), occluder_scale=(0.03, 0.12),
                            occluders=(0, 4)),
    # A 6 px star covers about 10 pixels, hence the lower pixel floor; the small margin lets some objects be
    # cut at the border as in the default variant.
    "small": SynthVariant(object_scale=(0.025, 0.1), objects=(15, 41), empty=0.05, centre_margin=0.02,
                          min_pixels=8, outline_scale=(0.025, 0.1), outlines=(2, 9), occluder_scale=(0.01, 0.05),
                          occluders=(2, 11)),
}

#: A scene's objects in pixels (square root of the unrotated box area): small, but within what the demo detector
#: learnt (19-120 px on 240x320 images) and finds there; below 24 px its recall is near 0 on its own data too.
SCENE_OBJECT_PX = (24.0, 64.0)
_REFERENCE = (240, 320)  # the default image, whose contents a scene repeats per area


def scene_variant(h: int, w: int) -> SynthVariant:
    """The layout of an ``h`` x ``w`` scene far larger than a detector's input (``detkit data synth --scene``):
    a 240x320 window of it looks like a default image with smaller objects.

    Objects are ``SCENE_OBJECT_PX`` in size, drawn at the default variant's count per area (about 3.5 per
    240x320, some 700 in a 4000x4000 scene) with the same occlusion rule, so about as crowded; their centres
    may lie anywhere, so the scene's border cuts some of them, as a tile's border will. Blobs and occluders have the default's sizes in
    pixels at 240x320 and its count per area; distractor outlines the objects' sizes. A background line joins
    two random points of the scene as in a default image, and crosses a window with probability about
    ``(window area + mean length * window perimeter / pi) / scene area`` (Crofton's formula, ignoring the
    border): enough of them that about 8 cross each window, as in a default image.
    """
    if min(h, w) < SCENE_OBJECT_PX[1]:
        raise ValueError(f"scene size {h}x{w}: expected at least {SCENE_OBJECT_PX[1]:g} px a side "
                         f"(the largest scene object)")
    ref_h, ref_w = _REFERENCE
    per_window = h * w / (ref_h * ref_w)
    short = min(h, w)

    def count(low: float, high: float) -> tuple[int, int]:  # per reference image -> [low, high) per scene
        lo = int(round(low * per_window))
        return lo, max(int(round(high * per_window)), lo + 1)

    def pixels(low: float, high: float) -> tuple[float, float]:
        return low / short, high / short

    mean_length = 0.37 * float(np.hypot(h, w))  # of a segment between two random points of a rectangle
    lines = max(8.0, 8 * h * w / (ref_h * ref_w + mean_length * 2 * (ref_h + ref_w) / np.pi)) / per_window
    default = VARIANTS["default"]
    return SynthVariant(object_scale=pixels(*SCENE_OBJECT_PX), objects=count(2.5, 4.5), empty=0.0,
                        centre_margin=0.0, min_pixels=default.min_pixels,
                        outline_scale=pixels(*SCENE_OBJECT_PX), outlines=count(0.5, 1.5),
                        occluder_scale=pixels(*(v * ref_h for v in default.occluder_scale)), occluders=count(1, 2),
                        lines=count(0.5 * lines, 1.5 * lines), blobs=count(2, 6),
                        blob_scale=pixels(*(v * ref_h for v in default.blob_scale)))


#: Variants whose layout depends on the image size: ``name -> f(h, w) -> SynthVariant``.
SIZED_VARIANTS = {"scene": scene_variant}


def _unit_polygon(kind: str) -> np.ndarray:
    """The outline of a shape in the unit square, (K, 2) in [-0.5, 0.5]."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "triangle":
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    a = 1 / 6  # cross: arms one third of the width
    return np.array([[-a, -0.5], [a, -0.5], [a, -a], [0.5, -a], [0.5, a], [a, a], [a, 0.5], [-a, 0.5], [-a, a],
                     [-0.5, a], [-0.5, -a], [-a, -a]])


_POLYGONS = {k: _unit_polygon(k) for k in CLASSES}


def _place(kind: str, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    pts = _POLYGONS[kind] * np.array([w, h])
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return np.round((pts + np.array([cx, cy])) * 16).astype(np.int32)  # 4 fractional bits for cv2


def _background(rng: np.random.Generator, h: int, w: int, variant: SynthVariant = VARIANTS["default"]) -> np.ndarray:
    """A colour gradient with pixel noise, lines and blobs ``(h, w, 3)`` uint8.

    The noise is drawn a band of rows at a time: the generator's stream is the same as for one ``(h, w, 3)``
    draw (so the pixels are too), but a large scene never holds more than one float64 band.
    """
    base = rng.uniform(60, 200, 3)
    direction = rng.uniform(-1, 1, 3)
    row = base[None, None, :] + np.linspace(-40, 40, w)[None, :, None] * direction[None, None, :]
    img = np.empty((h, w, 3), np.uint8)
    band = max(1, _BAND_VALUES // (3 * w))
    for y in range(0, h, band):
        noise = rng.normal(0, 12, (min(band, h - y), w, 3))
        img[y:y + band] = np.clip(row + noise, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(*variant.lines)):
        colour = tuple(int(v) for v in rng.uniform(30, 230, 3))
        p1 = tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h))
        p2 = tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(rng.integers(*variant.blobs)):  # in muted colours
        colour = tuple(int(v) for v in rng.uniform(40, 180, 3))
        centre = tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h))
        axes = tuple(int(v) for v in rng.uniform(*variant.blob_scale, 2) * min(h, w))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return img


def _jitter(rng: np.random.Generator, label: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-45, 46), 0, 255)) for c in COLOURS[label])


def _distractor_outlines(rng: np.random.Generator, img: np.ndarray, variant: SynthVariant) -> None:
    """Object shapes as thin outlines in off colours: shape alone is not a sufficient cue either."""
    h, w = img.shape[:2]
    for _ in range(rng.integers(*variant.outlines)):
        kind = CLASSES[rng.integers(len(CLASSES))]
        s = rng.uniform(*variant.outline_scale) * min(h, w)
        pts = _place(kind, rng.uniform(0, w), rng.uniform(0, h), s, s, rng.uniform(-0.3, 0.3))
        colour = tuple(int(v) for v in rng.uniform(20, 120, 3))
        cv2.polylines(img, [pts], True, colour, 1, cv2.LINE_AA, shift=4)


def _window_pixels(x0: int, y0: int, x1: int, y1: int, h: int, w: int, draw) -> tuple[np.ndarray, np.ndarray]:
    """``(ys, xs)`` in row-major order of the pixels of an ``h`` x ``w`` image that ``draw(mask, x0, y0)`` sets
    in the window ``[x0, x1) x [y0, y1)`` (cut at the image border) of a zero mask whose top left pixel is image
    pixel ``(x0, y0)``.

    A shape drawn in its bounding window, moved by whole pixels, sets the same pixels as drawn in the whole
    image: a full-image mask per shape would dominate the time of an image with dozens (a scene: hundreds) of
    small shapes.
    """
    x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), w), min(int(y1), h)
    mask = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), np.uint8)
    if mask.size:
        draw(mask, x0, y0)
    ys, xs = np.nonzero(mask)
    return ys + y0, xs + x0


def _polygon_pixels(pts: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels ``cv2.fillPoly`` sets for ``pts`` ((K, 2) int32 with 4 fractional bits), as ``(ys, xs)``."""
    (x0, y0), (x1, y1) = (pts.min(0) >> 4) - 1, (pts.max(0) >> 4) + 2

    def draw(mask, dx, dy):
        cv2.fillPoly(mask, [pts - np.array([dx, dy], np.int32) * 16], 1, cv2.LINE_8, shift=4)

    return _window_pixels(x0, y0, x1, y1, h, w, draw)


def _ellipse_pixels(centre: tuple[int, int], axes: tuple[int, int], angle: float, h: int,
                    w: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels a filled ``cv2.ellipse`` (integer ``centre`` and semi-``axes``) sets, as ``(ys, xs)``."""
    r = max(axes) + 2

    def draw(mask, dx, dy):
        cv2.ellipse(mask, (centre[0] - dx, centre[1] - dy), axes, angle, 0, 360, 1, -1)

    return _window_pixels(centre[0] - r, centre[1] - r, centre[0] + r + 1, centre[1] + r + 1, h, w, draw)


def _draw_objects(rng: np.random.Generator, swap_rng: np.random.Generator, img: np.ndarray, owner: np.ndarray,
                  variant: SynthVariant) -> tuple[list[int], list[int], list[list[int]]]:
    """Paint the objects of one image into ``img`` and their indices into ``owner`` ((H, W) int32, -1: none);
    returns their pixel counts, labels (0..4) and tight boxes (xyxy, whole shape inside the image)."""
    h, w = owner.shape
    n = 0 if rng.random() < variant.empty else int(rng.integers(*variant.objects))
    areas, labels, boxes = [], [], []
    short = min(h, w)
    for _ in range(n):
        label = int(rng.integers(len(CLASSES)))
        size = rng.uniform(*variant.object_scale) * short
        ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        ow, oh = size * np.sqrt(ratio), size / np.sqrt(ratio)
        m = variant.centre_margin
        cx, cy = rng.uniform(m * w, (1 - m) * w), rng.uniform(m * h, (1 - m) * h)
        pts = _place(CLASSES[label], cx, cy, ow, oh, rng.uniform(-0.25, 0.25))
        ys, xs = _polygon_pixels(pts, h, w)
        if len(xs) < variant.min_pixels:
            continue
        colour_of = label
        if swap_rng.random() < SWAPPED_COLOUR:
            colour_of = (label + int(swap_rng.integers(1, len(CLASSES)))) % len(CLASSES)
        colour = np.array(_jitter(rng, colour_of), np.float32)
        shade = 1.0 + rng.normal(0, 0.06, (len(ys), 1))  # a little texture on the object
        img[ys, xs] = np.clip(colour[None, :] * shade, 0, 255).astype(np.uint8)
        owner[ys, xs] = len(areas)
        areas.append(len(xs))
        labels.append(label)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return areas, labels, boxes


def _draw_occluders(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray, variant: SynthVariant) -> None:
    """Clutter ellipses painted over the objects; the pixels they cover belong to no object any more."""
    h, w = owner.shape
    short = min(h, w)
    for _ in range(rng.integers(*variant.occluders)):
        colour = tuple(int(v) for v in rng.uniform(30, 200, 3))
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(*variant.occluder_scale) * short), int(rng.uniform(*variant.occluder_scale) * short))
        ys, xs = _ellipse_pixels(centre, axes, float(rng.uniform(0, 180)), h, w)
        img[ys, xs] = colour
        owner[ys, xs] = -1


def render(rng: np.random.Generator, swap_rng: np.random.Generator, h: int, w: int,
           variant: SynthVariant = VARIANTS["default"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image ``(H, W, 3)`` uint8 RGB and its annotations ``(boxes (N, 4) float32 xyxy, labels (N,) in 0..4)``.

    ``rng`` draws the layout; ``swap_rng`` only which objects wear another class's colour (a stream of its own,
    so that the layout of an image does not depend on the swaps). ``variant`` sets the sizes and counts.
    """
    img = _background(rng, h, w, variant)
    _distractor_outlines(rng, img, variant)
    owner = np.full((h, w), -1, np.int32)
    areas, labels, boxes = _draw_objects(rng, swap_rng, img, owner, variant)
    _draw_occluders(rng, img, owner, variant)
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(areas))
    keep = [i for i in range(len(areas)) if visible[i] >= MIN_VISIBLE * areas[i]]
    return img, np.array([boxes[i] for i in keep], np.float32).reshape(-1, 4), np.array([labels[i] for i in keep],
                                                                                          np.int64)


def _write_png(path: str, image_rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    buf.tofile(path)


#: what a synthetic dataset folder holds (COCO or VOC layout): with ``overwrite``, a folder holding only these
#: is replaced as a whole
DATASET_ENTRIES = frozenset({"images", "annotations.json", "JPEGImages", "Annotations", "ImageSets"})


def synthesize(out_dir: str, fmt: str, num_images: int, seed: int, image_size: tuple[int, int] = (240, 320),
               variant: str = "default", overwrite: bool = False) -> dict:
    """Write ``num_images`` PNG images of ``image_size`` (h, w) with their annotations, drawn as ``variant``
    (a name in VARIANTS, or in SIZED_VARIANTS: ``scene``) says.

    ``fmt="coco"``: ``images/`` and ``annotations.json`` (category ids 1..5 in the order of CLASSES; a variant
    other than ``default`` is recorded as ``info.variant``).
    ``fmt="voc"``: ``JPEGImages/``, ``Annotations/*.xml`` (1-based VOC coordinates) and
    ``ImageSets/Main/{train,val,trainval,test}.txt``, where trainval and test list every image and
    train/val partition them (every fifth image is val). Image i is drawn from ``default_rng([seed, i])``
    (its colour swaps from ``default_rng([seed, i, 1])``), so the output is byte-identical for a seed.
    ``out_dir`` must be new or empty: writing into an earlier dataset would leave its images beside the new
    annotations. ``overwrite=True`` replaces a folder that holds a dataset and nothing else (written beside it,
    then swapped in: a reader sees the old dataset or the new one).
    Returns ``{"images", "objects", "per_class", "classes", "format", "variant"}``.
    """
    if variant not in VARIANTS and variant not in SIZED_VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(map(repr, [*VARIANTS, *SIZED_VARIANTS]))}")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")
    if fmt not in ("coco", "voc"):
        raise ValueError(f"format {fmt!r}: expected 'coco' or 'voc'")
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: expected at least 1")
    h, w = image_size
    if h < 32 or w < 32:
        raise ValueError(f"image size {h}x{w}: expected at least 32x32")
    layout = VARIANTS[variant] if variant in VARIANTS else SIZED_VARIANTS[variant](h, w)
    held = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if held and not overwrite:
        raise ValueError(f"{out_dir}: the folder is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''});"
                         f" a dataset written there would be mixed with what it holds: choose a new or empty folder, "
                         f"or replace the dataset in it with --overwrite")
    others = [name for name in held if name not in DATASET_ENTRIES]
    if others:
        raise ValueError(f"{out_dir}: --overwrite replaces a dataset folder, and this one also holds "
                         f"{', '.join(others[:4])}{', ...' if len(others) > 4 else ''}: choose another folder")
    if held:
        staged = os.path.join(os.path.dirname(os.path.abspath(out_dir)), f".{os.path.basename(out_dir)}.new")
        if os.path.isdir(staged):  # left by a call that was killed while writing it
            shutil.rmtree(staged)
        summary = synthesize(staged, fmt, num_images, seed, image_size, variant)
        replace_directory(staged, out_dir)
        return summary
    if fmt == "coco":
        img_dir = os.path.join(out_dir, "images")
    else:
        img_dir = os.path.join(out_dir, "JPEGImages")
        os.makedirs(os.path.join(out_dir, "Annotations"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "ImageSets", "Main"), exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations, names = [], [], []
    n_objects = 0
    per_class = np.zeros(len(CLASSES), np.int64)
    for i in range(num_images):
        img, boxes, labels = render(np.random.default_rng([seed, i]), np.random.default_rng([seed, i, 1]), h, w,
                                    layout)
        name = f"{i:06d}"
        _write_png(os.path.join(img_dir, name + ".png"), img)
        n_objects += len(boxes)
        per_class += np.bincount(labels, minlength=len(CLASSES))
        names.append(name)
        if fmt == "coco":
            images.append({"id": i + 1, "file_name": name + ".png", "height": h, "width": w})
            for box, label in zip(boxes, labels):
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0})
        else:
            objects = "".join(
                f"<object><name>{CLASSES[int(lab)]}</name><difficult>0</difficult><bndbox>"
                f"<xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin><xmax>{int(b[2])}</xmax>"
                f"<ymax>{int(b[3])}</ymax></bndbox></object>" for b, lab in zip(boxes, labels))
            write_text_atomic(os.path.join(out_dir, "Annotations", name + ".xml"),
                              f"<annotation><filename>{name}.png</filename><size><width>{w}</width>"
                              f"<height>{h}</height><depth>3</depth></size>{objects}</annotation>\n")
    if fmt == "coco":
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
        # The default variant writes no info, so that its files stay byte-identical to those of before variants.
        info = {} if variant == "default" else {"info": {"description": "detkit synthetic dataset", "variant": variant}}
        write_text_atomic(os.path.join(out_dir, "annotations.json"),
                          json.dumps({**info, "images": images, "annotations": annotations, "categories": categories}))
    else:
        # trainval and test list every image; train and val partition them (every fifth image is val),
        # so that neither is empty as long as there are two images.
        val = [n for i, n in enumerate(names) if i % 5 == 4] or names[-1:]
        in_val = set(val)
        train = [n for n in names if n not in in_val] or names
        for split, listed in (("train", train), ("val", val), ("trainval", names), ("test", names)):
            write_text_atomic(os.path.join(out_dir, "ImageSets", "Main", f"{split}.txt"),
                              "".join(n + "\n" for n in listed))
    return {"images": num_images, "objects": n_objects, "per_class": dict(zip(CLASSES, per_class.tolist())),
            "classes": list(CLASSES), "format": fmt, "variant": variant}


def synthesize_video(path: str, frames: int, seed: int, fps: int = 12, size: tuple[int, int] = (240, 320)) -> None:
    """Write ``frames`` frames of ``size`` (h, w) at ``fps`` to the mp4 ``path``: 3-5 of the dataset's
    objects moving, turning and bouncing off the borders over a cluttered background. The video is
    written to a temporary file in the same directory and renamed, so ``path`` is never left half-written.
    """
    if frames < 1:
        raise ValueError(f"frames={frames}: expected at least 1")
    if fps < 1:
        raise ValueError(f"fps={fps}: expected at least 1")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")
    h, w = size
    if h < 32 or w < 32:
        raise ValueError(f"video size {h}x{w}: expected at least 32x32")
    rng = np.random.default_rng([seed, 10**6])
    background = _background(rng, h, w)
    objects = []
    for _ in range(int(rng.integers(3, 6))):
        label = int(rng.integers(len(CLASSES)))
        s = rng.uniform(0.15, 0.4) * min(h, w)
        objects.append({"label": label, "w": s, "h": s * rng.uniform(0.7, 1.4),
                        "pos": rng.uniform(0.2, 0.8, 2) * (w, h), "vel": rng.uniform(-0.03, 0.03, 2) * (w, h),
                        "colour": _jitter(rng, label), "spin": rng.uniform(-0.05, 0.05), "angle": 0.0})
    # the temporary keeps the extension (mp4 when there is none): OpenCV picks the container by it
    with atomic_path(path, suffix=".tmp" + (os.path.splitext(path)[1] or ".mp4")) as tmp:
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        try:
            if not writer.isOpened():
                raise OSError(f"{path}: OpenCV cannot write mp4 video here")
            for _ in range(frames):
                writer.write(cv2.cvtColor(_video_frame(background, objects, w, h), cv2.COLOR_RGB2BGR))
        finally:
            writer.release()


def _video_frame(background: np.ndarray, objects: list[dict], w: int, h: int) -> np.ndarray:
    """The next frame: ``objects`` drawn on ``background``, then moved, turned and bounced off the borders."""
    frame = background.copy()
    for o in objects:
        pts = _place(CLASSES[o["label"]], o["pos"][0], o["pos"][1], o["w"], o["h"], o["angle"])
        cv2.fillPoly(frame, [pts], o["colour"], cv2.LINE_AA, shift=4)
        o["pos"] = o["pos"] + o["vel"]
        o["angle"] += o["spin"]
        for d, limit in ((0, w), (1, h)):
            if not 0 < o["pos"][d] < limit:
                o["vel"][d] *= -1
    return frame
