"""RoI feature extractors: RoI max pooling (Fast R-CNN Sec. 2.1) and RoIAlign.

Each maps a feature map ``(B, C, H, W)`` of stride s and per-image proposals
``list[Tensor[N_i, 4]]`` (xyxy, input-image pixels) to ``(sum N_i, C, S, S)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align as tv_roi_align, roi_pool

from detkit.config import ranged

from .sparse_roi_align import as_rois, roi_align as sparse_roi_align


def _kernel_dtype(features: Tensor) -> Tensor:
    """torchvision's CPU RoI kernels have no half/bfloat16 versions (and no CPU autocast rule): pool in
    float32 there; on CUDA the kernels' autocast rules handle it."""
    if features.device.type == "cpu" and features.dtype in (torch.float16, torch.bfloat16):
        return features.float()
    return features


@dataclass
class RoIPoolSettings:
    """The ``roi_pool`` extractor's config keys."""

    output_size: int | None = ranged(None, ge=1)  # side of the pooled grid; None: the backbone's (7 for VGG-16)


@dataclass
class RoIAlignSettings:
    """The ``roi_align`` extractor's config keys (Mask R-CNN Sec. 3)."""

    output_size: int | None = ranged(None, ge=1)  # None: the backbone's (14 for ResNet C4, whose res5 halves it)
    sampling_ratio: int = ranged(0, ge=0)  # bilinear samples per bin side; 0: adaptive (ceil(bin size))
    aligned: bool = False  # half-pixel offset (Detectron2's ROIAlignV2)
    # On the CPU in float32/64: pool as a multithreaded sparse product (ops/sparse_roi_align.py; same
    # results to float rounding, several times faster to train); false: torchvision's kernel everywhere.
    cpu_sparse: bool = True


@dataclass(frozen=True)
class PoolingOp:
    """What an extractor computes on each level, stated as torchvision operators, so that a graph written
    outside the module (``detkit export``) pools exactly as its ``pool`` does: ``op`` (``roi_align`` or
    ``roi_pool``) at each of ``sizes``, the grids flattened and concatenated when ``flatten`` (SPP)."""

    op: str
    sizes: tuple[int, ...]
    sampling_ratio: int = 0
    aligned: bool = False
    flatten: bool = False


class GridExtractor(nn.Module):
    """An extractor whose output per region is a ``(C, S, S)`` grid, ``output_size = (S, S)``."""

    output_size: tuple[int, int]

    def out_features(self, channels: int) -> int:
        """Length of one region's flattened ``(channels, S, S)`` grid."""
        return channels * self.output_size[0] * self.output_size[1]


def assign_levels(boxes: Tensor, strides: list[int], k0: int = 4, canonical: float = 224.0) -> Tensor:
    """The FPN paper's Eq. 1 (Lin et al. 2017, Sec. 4.2): a box of w x h input pixels goes to level
    ``k = floor(k0 + log2(sqrt(w h) / 224))``, clamped to the pyramid; returns the index into ``strides``
    (consecutive powers of two, finest first) of each box of ``boxes (K, 4)``."""
    return level_indices(boxes, strides[0].bit_length() - 1, strides[-1].bit_length() - 1, k0, canonical)


def level_indices(boxes: Tensor, k_min: int, k_max: int, k0: float = 4.0, canonical: float = 224.0) -> Tensor:
    """:func:`assign_levels` for a pyramid of levels ``k_min..k_max`` (stride ``2^k``): the index from ``k_min``
    (TorchScript compiles it in ``detkit export``'s graph)."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    # The 1e-6 is torchvision's (LevelMapper): a box exactly at a level boundary goes to the coarser level.
    k = torch.floor(k0 + torch.log2(torch.sqrt(area) / canonical) + 1e-6)  # area 0: -inf, clamped below
    return (k.clamp(k_min, k_max) - k_min).to(torch.int64)


class LevelPooling(nn.Module):
    """Pooling regions from one feature map of stride ``strides[0]``, or from a pyramid (a list of maps,
    finest first), each region from the level :func:`assign_levels` gives it; the first ``len(strides)``
    maps are pooled (a neck's extra coarse maps serve the RPN only). Subclasses give
    ``pool(features (B, C, H, W), boxes, spatial_scale)``, ``boxes`` per image or ``(K, 5)`` rows."""

    def __init__(self, strides: int | list[int]):
        super().__init__()
        self.strides = [int(strides)] if isinstance(strides, int) else [int(s) for s in strides]
        if len(self.strides) > 1 and any(b != 2 * a for a, b in zip(self.strides, self.strides[1:])):
            raise ValueError(f"RoI pooling over a pyramid needs strides doubling level to level, got {self.strides}")
        self.spatial_scale = 1.0 / self.strides[0]

    def pool(self, features: Tensor, boxes, spatial_scale: float) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Tensor | list[Tensor], proposals: list[Tensor], image_sizes=None) -> Tensor:
        if isinstance(features, Tensor) or len(self.strides) == 1:
            single = _kernel_dtype(features if isinstance(features, Tensor) else features[0])
            return self.pool(single, [p.to(single.dtype) for p in proposals], self.spatial_scale)
        maps = [_kernel_dtype(f) for f in features[: len(self.strides)]]
        rois = as_rois(proposals, maps[0]).to(maps[0].dtype)
        levels = assign_levels(rois[:, 1:], self.strides)
        out = None
        for k, level in enumerate(maps):
            rows = torch.nonzero(levels == k).squeeze(1)
            pooled = self.pool(level, rois[rows], 1.0 / self.strides[k])
            if out is None:
                out = pooled.new_zeros((rois.shape[0], *pooled.shape[1:]))
            out[rows] = pooled
        return out


class RoIPoolExtractor(LevelPooling, GridExtractor):
    def __init__(self, output_size: int = 7, strides: int | list[int] = 16):
        super().__init__(strides)
        self.output_size = (int(output_size), int(output_size))

    def pool(self, features: Tensor, boxes, spatial_scale: float) -> Tensor:
        return roi_pool(features, boxes, self.output_size, spatial_scale)

    def pooling_op(self) -> PoolingOp:
        return PoolingOp("roi_pool", (self.output_size[0],))


class RoIAlignExtractor(LevelPooling, GridExtractor):
    def __init__(self, output_size: int = 7, strides: int | list[int] = 16, sampling_ratio: int = 0,
                 aligned: bool = False, cpu_sparse: bool = True):
        super().__init__(strides)
        self.output_size = (int(output_size), int(output_size))
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.cpu_sparse = cpu_sparse

    def pool(self, features: Tensor, boxes, spatial_scale: float) -> Tensor:
        kernel = sparse_roi_align if self.cpu_sparse else tv_roi_align
        return kernel(features, boxes, self.output_size, spatial_scale, self.sampling_ratio, self.aligned)

    def pooling_op(self) -> PoolingOp:
        return PoolingOp("roi_align", (self.output_size[0],), self.sampling_ratio, self.aligned)
