"""RoI feature extractors: RoI max pooling (Fast R-CNN Sec. 2.1) and RoIAlign.

Each maps a feature map ``(B, C, H, W)`` of stride s and per-image proposals
``list[Tensor[N_i, 4]]`` (xyxy, input-image pixels) to ``(sum N_i, C, S, S)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool


def _kernel_dtype(features: Tensor) -> Tensor:
    """torchvision's CPU RoI kernels have no half/bfloat16 versions (and no CPU autocast rule): pool in
    float32 there; on CUDA the kernels' autocast rules handle it."""
    if features.device.type == "cpu" and features.dtype in (torch.float16, torch.bfloat16):
        return features.float()
    return features


@dataclass
class RoIPoolSettings:
    """The ``roi_pool`` extractor's config keys."""

    output_size: int | None = None  # side of the pooled grid; None: the backbone's (7 for VGG-16)


@dataclass
class RoIAlignSettings:
    """The ``roi_align`` extractor's config keys (Mask R-CNN Sec. 3)."""

    output_size: int | None = None  # None: the backbone's (14 for ResNet C4, whose res5 halves it)
    sampling_ratio: int = 0  # bilinear samples per bin side; 0: adaptive (ceil(bin size))
    aligned: bool = False  # half-pixel offset (Detectron2's ROIAlignV2)


class GridExtractor(nn.Module):
    """An extractor whose output per region is a ``(C, S, S)`` grid, ``output_size = (S, S)``."""

    output_size: tuple[int, int]

    def out_features(self, channels: int) -> int:
        """Length of one region's flattened ``(channels, S, S)`` grid."""
        return channels * self.output_size[0] * self.output_size[1]


class RoIPoolExtractor(GridExtractor):
    def __init__(self, output_size: int = 7, stride: int = 16):
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.spatial_scale = 1.0 / stride

    def forward(self, features: Tensor, proposals: list[Tensor], image_sizes=None) -> Tensor:
        features = _kernel_dtype(features)
        return roi_pool(features, [p.to(features.dtype) for p in proposals], self.output_size, self.spatial_scale)


class RoIAlignExtractor(GridExtractor):
    def __init__(self, output_size: int = 7, stride: int = 16, sampling_ratio: int = 0, aligned: bool = False):
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.spatial_scale = 1.0 / stride
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: Tensor, proposals: list[Tensor], image_sizes=None) -> Tensor:
        features = _kernel_dtype(features)
        return roi_align(features, [p.to(features.dtype) for p in proposals], self.output_size,
                         self.spatial_scale, self.sampling_ratio, self.aligned)

