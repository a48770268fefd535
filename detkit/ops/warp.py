"""Warped region extraction of R-CNN (Girshick et al. 2014, Sec. 2.1 and Appendix A).

Each proposal is dilated so that, once warped to the CNN's fixed input size,
there are exactly ``p = 16`` pixels of image context around the original box,
then cropped from the *image* and warped anisotropically to ``warp_size x
warp_size``. Context that falls outside the image is the mean pixel (zero after
normalisation), as in R-CNN. The warped windows go through the whole CNN trunk
(no computation is shared between windows: this is R-CNN's cost) and the trunk's
output is max-pooled to the grid the RoI head expects (pool5). Cropping and
warping is one bilinear ``roi_align`` call over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detkit.config import ranged
from detkit.ops.roi import GridExtractor, _kernel_dtype


def context_padded_boxes(boxes: Tensor, warp_size: int, context_padding: int) -> Tensor:
    """Dilate ``boxes (N, 4)`` xyxy about their centres so the original box covers ``warp_size - 2p``
    of the warped window: each side grows by ``p / (warp_size - 2p)`` of the box's extent."""
    inner = warp_size - 2 * context_padding
    if inner <= 0:
        raise ValueError(f"context_padding={context_padding} leaves no room in a {warp_size}-pixel window")
    scale = warp_size / inner
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * scale / 2
    half_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) * scale / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def warp_regions(images: Tensor, proposals: list[Tensor], warp_size: int, context_padding: int = 16) -> Tensor:
    """``images (B, 3, H, W)`` normalised, ``proposals`` per image (xyxy, image pixels) ->
    ``(sum N_i, 3, warp_size, warp_size)`` warped windows. Windows narrower than a pixel are widened to one
    pixel (a degenerate proposal still yields a window)."""
    boxes = [context_padded_boxes(p.to(images.dtype), warp_size, context_padding) for p in proposals]
    # aligned=True: pixel centres at half-integers, so a window maps exactly onto its pixels.
    return roi_align(images, boxes, (warp_size, warp_size), 1.0, 2, True)


@dataclass
class WarpSettings:
    """The ``warp`` extractor's config keys (R-CNN Appendix A)."""

    output_size: int | None = ranged(None, ge=1)  # the pool5 grid the RoI head expects; None: the backbone's
    context_padding: int = ranged(16, ge=0)  # pixels of context around the box at the warped size
    # side of the warped window; None: the backbone's input size (227 for AlexNet)
    warp_size: int | None = ranged(None, ge=1)
    warp_batch: int = ranged(128, ge=1)  # windows through the CNN at a time (bounds memory)


class WarpExtractor(GridExtractor):
    """R-CNN's region features: ``(images (B, 3, H, W), proposals) -> (sum N_i, C, S, S)`` pool5 grids.

    ``trunk`` is the backbone's detection trunk (conv1 .. conv5), which this
    extractor owns; the detector's own trunk is the identity, so "features" are
    the normalised images.
    """

    def __init__(self, trunk: nn.Module, output_size: int, warp_size: int, context_padding: int = 16,
                 warp_batch: int = 128):
        super().__init__()
        self.trunk = trunk
        self.output_size = (int(output_size), int(output_size))
        self.warp_size = int(warp_size)
        self.context_padding = int(context_padding)
        self.warp_batch = max(1, int(warp_batch))
        context_padded_boxes(torch.zeros(0, 4), self.warp_size, self.context_padding)  # validates the sizes

    def forward(self, images: Tensor, proposals: list[Tensor], image_sizes=None) -> Tensor:
        windows = warp_regions(_kernel_dtype(images), proposals, self.warp_size, self.context_padding)
        if windows.shape[0] == 0:
            out = self.trunk(images.new_zeros(1, images.shape[1], self.warp_size, self.warp_size))
            return out.new_zeros((0, out.shape[1], *self.output_size))
        pooled = [F.adaptive_max_pool2d(self.trunk(chunk.to(images.dtype)), self.output_size)
                  for chunk in windows.split(self.warp_batch)]
        return torch.cat(pooled)
