"""Drawing detections on images: one box outline and one filled "name 0.87" tag per detection.

Used by ``detkit infer`` (annotated images and videos) and the evaluation report, which draws ground truth
with name-only tags. Each class keeps one colour everywhere (``color_for``), and the tag is always placed
inside the image, even for boxes on the border and images as small as 32x32. A crowded picture keeps its
content visible: tags shrink with the boxes (down to the smallest readable size), a tag that would overlap
a more confident box's tag is left out, and tags cover at most a quarter of the picture. It lives in the
evaluation layer, the lowest that draws, so that the report's gallery and ``detkit infer`` (above it) share
it. (No paper section: this is output plumbing.)
"""
from __future__ import annotations

import colorsys
from typing import NamedTuple

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_FONT_SCALE = 0.3  # smaller Hershey text is unreadable
TAG_PER_BOX = 0.5  # a tag is at most this fraction of the typical (median) box's shorter side tall
TAG_COVER = 0.25  # share of the picture the tags may cover (the most confident box always gets its tag)


def color_for(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class ``label``; consecutive labels step the hue by the golden ratio,
    so any few classes drawn together get clearly different colours."""
    hue = (int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _fit_text(name: str, score: float | None, max_width: int, scale: float) -> tuple[str, int, int, int]:
    """The longest of "name score", a shortened name, or the score alone that fits ``max_width`` pixels
    (without a score: the name or a shortened name)."""
    suffix = "" if score is None else f" {score:.2f}"
    candidates = [name + suffix] + [f"{name[:n]}.{suffix}" for n in range(len(name) - 1, 0, -1)]
    if score is not None:
        candidates.append(f"{score:.2f}")
    for text in candidates:
        (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
        if tw + 2 <= max_width:
            break
    return text, tw, th, base


class Tag(NamedTuple):
    """One detection's tag: ``text`` on a filled ``width`` x ``height`` rectangle at ``(x, y)`` (its top left)."""

    index: int
    text: str
    x: int
    y: int
    width: int
    height: int
    text_height: int


def font_scale(boxes: np.ndarray, height: int, width: int) -> float:
    """The tags' font scale for ``boxes (N, 4)`` on a ``height`` x ``width`` picture: growing with the
    picture, but no taller than ``TAG_PER_BOX`` of the median box's shorter side, and never below
    ``MIN_FONT_SCALE``."""
    scale = max(MIN_FONT_SCALE, min(height, width) / 600)
    if len(boxes):
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        (_, th), base = cv2.getTextSize("Ag", FONT, 1.0, 1)
        scale = min(scale, max(MIN_FONT_SCALE, TAG_PER_BOX * float(np.median(sides)) / (th + base)))
    return scale


def place_tags(boxes: np.ndarray, names: list[str], scores: np.ndarray | None, height: int, width: int,
               scale: float) -> list[Tag]:
    """Tags for ``boxes (N, 4)`` (integer xyxy inside the picture, most important first), each above its box
    when there is room, else just inside its top edge, clamped into the picture. A tag that would overlap
    one already placed, or take the tags' cover past ``TAG_COVER`` of the picture, is left out (the first
    box always gets its tag). ``scores`` None: name-only tags (ground truth)."""
    tags: list[Tag] = []
    covered, budget = 0, TAG_COVER * height * width
    for k, (x1, y1, _, _) in enumerate(boxes.tolist()):
        text, tw, th, base = _fit_text(names[k], None if scores is None else float(scores[k]), width, scale)
        tag_w, tag_h = tw + 2, th + base + 2
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1
        ty = max(0, min(ty, height - tag_h))
        tx = max(0, min(x1, width - tag_w))
        if tags and (covered + tag_w * tag_h > budget or any(
                tx < t.x + t.width and t.x < tx + tag_w and ty < t.y + t.height and t.y < ty + tag_h for t in tags)):
            continue
        tags.append(Tag(k, text, tx, ty, tag_w, tag_h, th))
        covered += tag_w * tag_h
    return tags


def draw_detections(image: np.ndarray, boxes, scores, labels, class_names: list[str],
                    score_thr: float = 0.0) -> np.ndarray:
    """A copy of ``image`` with every detection scoring at least ``score_thr`` drawn on it.

    Args:
        image: ``(H, W, 3) uint8`` RGB; not modified.
        boxes: ``(N, 4)`` xyxy absolute pixels (tensor, array or nested list); clipped to the image.
        scores: ``(N,)``; drawn in increasing order so the most confident detection ends up on top, and the
            most confident get their tags first (:func:`place_tags`). None: ground truth, every box drawn
            with its class name only, in the given order.
        labels: ``(N,)`` in 1..K; label ``i`` is ``class_names[i - 1]`` (``"class i"`` if out of range).
        class_names: the K class names.
        score_thr: detections below it are not drawn.

    Returns:
        ``(H, W, 3) uint8`` RGB.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"draw_detections: expected an (H, W, 3) uint8 RGB image, got {desc}")
    boxes = _numpy(boxes, np.float64).reshape(-1, 4)
    labels = _numpy(labels, np.int64).reshape(-1)
    given = None if scores is None else _numpy(scores, np.float64).reshape(-1)
    if not len(boxes) == len(labels) == (len(boxes) if given is None else len(given)):
        counts = f"{len(boxes)} boxes, {'no' if given is None else len(given)} scores and {len(labels)} labels"
        raise ValueError(f"draw_detections: {counts}; expected one of each per detection")
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    if given is None:
        order = np.arange(len(boxes))
    else:
        order = np.array([i for i in np.argsort(given, kind="stable") if given[i] >= score_thr], np.int64)  # not NaN
    pixel = np.nan_to_num(boxes[order]).round().astype(np.int64).reshape(-1, 4)
    pixel[:, 0::2] = np.sort(pixel[:, 0::2].clip(0, w - 1), axis=1)
    pixel[:, 1::2] = np.sort(pixel[:, 1::2].clip(0, h - 1), axis=1)
    thickness = max(1, int(round(min(h, w) / 300)))
    for (x1, y1, x2, y2), i in zip(pixel.tolist(), order):
        cv2.rectangle(out, (x1, y1), (x2, y2), color_for(int(labels[i])), thickness)
    first = order if given is None else order[::-1]  # the most important box gets its tag first
    names = [class_names[k - 1] if 1 <= k <= len(class_names) else f"class {k}" for k in labels[first].tolist()]
    scale = font_scale(pixel.astype(np.float64), h, w)
    for tag in place_tags(pixel if given is None else pixel[::-1], names, None if given is None else given[first],
                          h, w, scale):
        colour = color_for(int(labels[first[tag.index]]))
        cv2.rectangle(out, (tag.x, tag.y), (tag.x + tag.width - 1, tag.y + tag.height - 1), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(out, tag.text, (tag.x + 1, tag.y + tag.text_height + 1), FONT, scale, ink, 1, cv2.LINE_AA)
    return out
