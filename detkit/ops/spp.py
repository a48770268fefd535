"""Spatial pyramid pooling of windows (He et al., SPP-net, 2014, Sec. 2.3 and 3.1).

Each window is projected onto the conv5 feature map and max-pooled into a fixed
pyramid of ``l x l`` bins for every level ``l`` (``{6, 3, 2, 1}`` in the
paper's detection network); the bins of all levels are concatenated into one
vector of ``C * sum(l^2)`` numbers, whatever the window's size. RoI pooling
(Fast R-CNN) is the one-level special case. The bins come from torchvision's
``roi_pool`` kernel, one call per level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import roi_pool

from detkit.config import ranged
from detkit.ops.roi import LevelPooling, PoolingOp


@dataclass
class SPPSettings:
    """The ``spp`` extractor's config keys."""

    levels: list[int] = ranged(default_factory=lambda: [6, 3, 2, 1], ge=1)  # pyramid levels l (l x l bins each)


class SpatialPyramidPool(LevelPooling):
    """``features (B, C, H, W)``, ``proposals list[Tensor[N_i, 4]]`` (input-image xyxy) -> ``(sum N_i, C * sum l^2)``.

    The output is a flat vector per window, level by level (coarse-to-fine order
    follows ``levels``), each level channel-major as a flattened ``(C, l, l)`` block. Over a feature
    pyramid (a neck), each window is pooled from the map the FPN rule assigns it.
    """

    def __init__(self, levels: list[int] | tuple[int, ...] = (6, 3, 2, 1), strides: int | list[int] = 16):
        super().__init__(strides)
        levels = [int(v) for v in levels]
        if not levels or any(v < 1 for v in levels):
            raise ValueError(f"model.roi_extractor.levels={levels}: expected positive integers")
        self.levels = levels

    def out_features(self, channels: int) -> int:
        """Length of the pooled vector for a ``channels``-channel feature map."""
        return channels * sum(v * v for v in self.levels)

    def pool(self, features: Tensor, boxes, spatial_scale: float) -> Tensor:
        return torch.cat([roi_pool(features, boxes, (v, v), spatial_scale).flatten(1) for v in self.levels], dim=1)

    def pooling_op(self) -> PoolingOp:
        return PoolingOp("roi_pool", tuple(self.levels), flatten=True)
