"""RoI feature extractors: RoI max pooling (Fast R-CNN Sec. 2.1) and RoIAlign.

Each maps a feature map ``(B, C, H, W)`` of stride s and per-image proposals
``list[Tensor[N_i, 4]]`` (xyxy, input-image pixels) to ``(sum N_i, C, S, S)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool


def _kernel_dtype(features: Tensor) -> Tensor:
    """torchvision's CPU RoI kernels have no half/bfloat16 versions (and no CPU autocast rule): pool in
    float32 there; on CUDA the kernels' autocast rules handle it."""
    if features.device.type == "cpu" and features.dtype in (torch.float16, torch.bfloat16):
        return features.float()
    return features


class RoIPoolExtractor(nn.Module):
    def __init__(self, output_size: int = 7, stride: int = 16):
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.spatial_scale = 1.0 / stride

    def forward(self, features: Tensor, proposals: list[Tensor], image_sizes=None) -> Tensor:
        features = _kernel_dtype(features)
        return roi_pool(features, [p.to(features.dtype) for p in proposals], self.output_size, self.spatial_scale)


class RoIAlignExtractor(nn.Module):
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

