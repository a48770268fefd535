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
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ((220, 40, 40), (40, 190, 60), (50, 70, 220), (235, 215, 40), (210, 50, 210))  # RGB
MIN_VISIBLE = 0.4
SWAPPED_COLOUR = 0.15  # fraction of objects in another class's colour


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


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(60, 200, 3)
    direction = rng.uniform(-1, 1, 3)
    ramp = np.linspace(-40, 40, w)[None, :, None] * direction[None, None, :]
    img = base[None, None, :] + ramp + rng.normal(0, 12, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(4, 12)):  # lines
        colour = tuple(int(v) for v in rng.uniform(30, 230, 3))
        p1 = tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h))
        p2 = tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(rng.integers(2, 7)):  # blobs in muted colours
        colour = tuple(int(v) for v in rng.uniform(40, 180, 3))
        centre = tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h))
        axes = tuple(int(v) for v in rng.uniform(0.03, 0.15, 2) * min(h, w))
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


def _polygon_pixels(pts: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ys, xs)`` in row-major order of the pixels of an ``h`` x ``w`` image that ``cv2.fillPoly`` sets for
    ``pts`` ((K, 2) int32 with 4 fractional bits).

    Rasterized in the polygon's bounding window, moved by whole pixels, which sets the same pixels: a
    full-image mask per object would dominate the time of an image with dozens of small objects.
    """
    x0, y0 = np.maximum((pts.min(0) >> 4) - 1, 0)
    x1, y1 = np.minimum((pts.max(0) >> 4) + 2, (w, h))
    mask = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), np.uint8)
    if mask.size:
        cv2.fillPoly(mask, [pts - np.array([x0, y0], np.int32) * 16], 1, cv2.LINE_8, shift=4)
    ys, xs = np.nonzero(mask)
    return ys + y0, xs + x0


def render(rng: np.random.Generator, swap_rng: np.random.Generator, h: int, w: int,
           variant: SynthVariant = VARIANTS["default"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image ``(H, W, 3)`` uint8 RGB and its annotations ``(boxes (N, 4) float32 xyxy, labels (N,) in 0..4)``.

    ``rng`` draws the layout; ``swap_rng`` only which objects wear another class's colour (a stream of its own,
    so that the layout of an image does not depend on the swaps). ``variant`` sets the sizes and counts.
    """
    img = _background(rng, h, w)
    _distractor_outlines(rng, img, variant)
    n = 0 if rng.random() < variant.empty else int(rng.integers(*variant.objects))
    owner = np.full((h, w), -1, np.int32)
    areas, labels, boxes = [], [], []
    short = min(h, w)
    for k in range(n):
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
        owner[ys, xs] = k
        areas.append(len(xs))
        labels.append(label)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # Occluders in front: clutter drawn over the objects.
    for _ in range(rng.integers(*variant.occluders)):
        colour = tuple(int(v) for v in rng.uniform(30, 200, 3))
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(*variant.occluder_scale) * short), int(rng.uniform(*variant.occluder_scale) * short))
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        hidden = mask > 0
        img[hidden] = colour
        owner[hidden] = -1
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(areas)) if areas else np.zeros(0)
    keep = [i for i in range(len(areas)) if visible[i] >= MIN_VISIBLE * areas[i]]
    return img, np.array([boxes[i] for i in keep], np.float32).reshape(-1, 4), np.array([labels[i] for i in keep],
                                                                                          np.int64)


def _write_png(path: str, image_rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    buf.tofile(path)


def _write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def synthesize(out_dir: str, fmt: str, num_images: int, seed: int, image_size: tuple[int, int] = (240, 320),
               variant: str = "default") -> dict:
    """Write ``num_images`` PNG images of ``image_size`` (h, w) with their annotations, drawn as ``variant``
    (a name in VARIANTS) says.

    ``fmt="coco"``: ``images/`` and ``annotations.json`` (category ids 1..5 in the order of CLASSES; a variant
    other than ``default`` is recorded as ``info.variant``).
    ``fmt="voc"``: ``JPEGImages/``, ``Annotations/*.xml`` (1-based VOC coordinates) and
    ``ImageSets/Main/{train,val,trainval,test}.txt``, where trainval and test list every image and
    train/val partition them (every fifth image is val). Image i is drawn from ``default_rng([seed, i])``
    (its colour swaps from ``default_rng([seed, i, 1])``), so the output is byte-identical for a seed.
    Returns ``{"images", "objects", "per_class", "classes", "format", "variant"}``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(map(repr, VARIANTS))}")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")
    if fmt not in ("coco", "voc"):
        raise ValueError(f"format {fmt!r}: expected 'coco' or 'voc'")
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: expected at least 1")
    h, w = image_size
    if h < 32 or w < 32:
        raise ValueError(f"image size {h}x{w}: expected at least 32x32")
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
                                    VARIANTS[variant])
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
            _write_text_atomic(os.path.join(out_dir, "Annotations", name + ".xml"),
                               f"<annotation><filename>{name}.png</filename><size><width>{w}</width>"
                               f"<height>{h}</height><depth>3</depth></size>{objects}</annotation>\n")
    if fmt == "coco":
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
        # The default variant writes no info, so that its files stay byte-identical to those of before variants.
        info = {} if variant == "default" else {"info": {"description": "detkit synthetic dataset", "variant": variant}}
        _write_text_atomic(os.path.join(out_dir, "annotations.json"),
                           json.dumps({**info, "images": images, "annotations": annotations, "categories": categories}))
    else:
        # trainval and test list every image; train and val partition them (every fifth image is val),
        # so that neither is empty as long as there are two images.
        val = [n for i, n in enumerate(names) if i % 5 == 4] or names[-1:]
        in_val = set(val)
        train = [n for n in names if n not in in_val] or names
        for split, listed in (("train", train), ("val", val), ("trainval", names), ("test", names)):
            _write_text_atomic(os.path.join(out_dir, "ImageSets", "Main", f"{split}.txt"),
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
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".mp4", dir=directory)
    os.close(fd)
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        os.remove(tmp)
        raise OSError(f"{path}: OpenCV cannot write mp4 video here")
    try:
        for _ in range(frames):
            frame = background.copy()
            for o in objects:
                pts = _place(CLASSES[o["label"]], o["pos"][0], o["pos"][1], o["w"], o["h"], o["angle"])
                cv2.fillPoly(frame, [pts], o["colour"], cv2.LINE_AA, shift=4)
                o["pos"] = o["pos"] + o["vel"]
                o["angle"] += o["spin"]
                for d, limit in ((0, w), (1, h)):
                    if not 0 < o["pos"][d] < limit:
                        o["vel"][d] *= -1
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        os.replace(tmp, path)
    except BaseException:
        writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
