"""Drawing detections on images: one box outline and one filled "name 0.87" tag per detection.

Used by ``detkit infer`` (annotated images and videos) and the evaluation report. Each class keeps one
colour everywhere (``color_for``), and the tag is always placed inside the image, even for boxes on the
border and images as small as 32x32. (No paper section: this is output plumbing.)
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_FONT_SCALE = 0.3  # smaller Hershey text is unreadable


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


def _fit_text(name: str, score: float, max_width: int, scale: float) -> tuple[str, int, int, int]:
    """The longest of "name score", a shortened name, or the score alone that fits ``max_width`` pixels."""
    candidates = [f"{name} {score:.2f}"] + [f"{name[:n]}. {score:.2f}" for n in range(len(name) - 1, 0, -1)]
    candidates.append(f"{score:.2f}")
    for text in candidates:
        (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
        if tw + 2 <= max_width:
            break
    return text, tw, th, base


def draw_detections(image: np.ndarray, boxes, scores, labels, class_names: list[str],
                    score_thr: float = 0.0) -> np.ndarray:
    """A copy of ``image`` with every detection scoring at least ``score_thr`` drawn on it.

    Args:
        image: ``(H, W, 3) uint8`` RGB; not modified.
        boxes: ``(N, 4)`` xyxy absolute pixels (tensor, array or nested list); clipped to the image.
        scores: ``(N,)``; drawn in increasing order so the most confident detection ends up on top.
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
    scores = _numpy(scores, np.float64).reshape(-1)
    labels = _numpy(labels, np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"draw_detections: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels; "
                         f"expected one of each per detection")
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    scale = max(MIN_FONT_SCALE, min(h, w) / 600)
    thickness = max(1, int(round(min(h, w) / 300)))
    for i in np.argsort(scores, kind="stable"):
        if not scores[i] >= score_thr:  # also skips NaN scores
            continue
        x1, y1, x2, y2 = np.nan_to_num(boxes[i]).round().astype(np.int64).tolist()
        x1, x2 = sorted((min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)))
        y1, y2 = sorted((min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)))
        label = int(labels[i])
        colour = color_for(label)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)

        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        text, tw, th, base = _fit_text(name, float(scores[i]), w, scale)
        tag_w, tag_h = tw + 2, th + base + 2
        # Above the box when there is room, else just inside its top edge; clamped into the image.
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1
        ty = max(0, min(ty, h - tag_h))
        tx = max(0, min(x1, w - tag_w))
        cv2.rectangle(out, (tx, ty), (tx + tag_w - 1, ty + tag_h - 1), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(out, text, (tx + 1, ty + th + 1), FONT, scale, ink, 1, cv2.LINE_AA)
    return out
