"""Drawing detections: a box and a "class score" tag per detection, one colour per class."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np


def color_for(label: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for a class label (golden-ratio hue steps)."""
    hue = (int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes, scores, labels, class_names: list[str],
                    score_thr: float = 0.0) -> np.ndarray:
    """A copy of ``image (H, W, 3) uint8 RGB`` with every detection scoring >= ``score_thr`` drawn."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scale = max(0.3, min(h, w) / 600)
    thickness = max(1, int(round(min(h, w) / 300)))
    for i in np.argsort(scores):  # highest score drawn last, on top
        if scores[i] < score_thr:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        label = int(labels[i])
        colour = color_for(label)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        text = f"{name} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        # Tag above the box when there is room, inside it otherwise; always within the image.
        ty = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else min(y1, max(0, h - th - base - 2))
        tx = max(0, min(x1, w - tw - 2))
        cv2.rectangle(out, (tx, ty), (tx + tw + 2, ty + th + base + 2), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(out, text, (tx + 1, ty + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, 1, cv2.LINE_AA)
    return out
