"""Box arithmetic: IoU, the R-CNN box parameterisation, clipping and NMS.

The box coder implements the regression targets of R-CNN (Girshick et al.
2014, Appendix C), used unchanged by Fast and Faster R-CNN::

    t_x = w_x (x - x_a) / w_a      t_w = w_w log(w / w_a)
    t_y = w_y (y - y_a) / h_a      t_h = w_h log(h / h_a)

with per-coordinate weights (1, 1, 1, 1 for the RPN, 10, 10, 5, 5 for the RoI
head, which is the Fast R-CNN target normalisation written as weights).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms as _tv_batched_nms
from torchvision.ops import box_iou as _tv_box_iou
from torchvision.ops import clip_boxes_to_image as _tv_clip
from torchvision.ops import remove_small_boxes as _tv_remove_small

# exp(dw) is clamped so a wild prediction cannot overflow: log(1000 / 16) as in Detectron.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``boxes1 (N, 4)`` and ``boxes2 (M, 4)`` (xyxy) -> ``(N, M)``."""
    return _tv_box_iou(boxes1, boxes2)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip ``boxes (..., 4)`` to an image of ``size = (height, width)``."""
    return _tv_clip(boxes, size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes whose width and height are both >= ``min_size``."""
    return _tv_remove_small(boxes, min_size)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-category NMS: boxes of different ``idxs`` never suppress each other.
    Returns kept indices sorted by decreasing score."""
    return _tv_batched_nms(boxes, scores, idxs, iou_threshold)


class BoxCoder:
    """Encodes boxes as deltas from reference boxes and decodes them back."""

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas ``(N, 4)`` that take ``reference (N, 4)`` to ``boxes (N, 4)``."""
        wx, wy, ww, wh = self.weights
        rw = reference[:, 2] - reference[:, 0]
        rh = reference[:, 3] - reference[:, 1]
        rx = reference[:, 0] + 0.5 * rw
        ry = reference[:, 1] + 0.5 * rh
        bw = boxes[:, 2] - boxes[:, 0]
        bh = boxes[:, 3] - boxes[:, 1]
        bx = boxes[:, 0] + 0.5 * bw
        by = boxes[:, 1] + 0.5 * bh
        return torch.stack(
            (wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)), dim=1
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes from ``deltas (N, 4k)`` applied to ``reference (N, 4)`` -> ``(N, 4k)``.

        k > 1 is the class-specific case (one box per class per RoI).
        """
        return decode_boxes(deltas, reference, self.weights, self.scale_clamp)


def decode_boxes(deltas: Tensor, reference: Tensor, weights: tuple[float, float, float, float],
                 scale_clamp: float) -> Tensor:
    """:meth:`BoxCoder.decode` as a free function (TorchScript compiles it inside ``detkit export``'s graph)."""
    reference = reference.to(deltas.dtype)
    wx, wy, ww, wh = weights
    widths = (reference[:, 2] - reference[:, 0])[:, None]
    heights = (reference[:, 3] - reference[:, 1])[:, None]
    cx = reference[:, 0, None] + 0.5 * widths
    cy = reference[:, 1, None] + 0.5 * heights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    pcx = dx * widths + cx
    pcy = dy * heights + cy
    pw = torch.exp(dw) * widths
    ph = torch.exp(dh) * heights
    out = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=2)
    return out.reshape(deltas.shape[0], deltas.shape[1])  # explicit: N may be 0 (no proposals)
