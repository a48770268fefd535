"""Feature Pyramid Network (Lin et al. 2017), the neck between a backbone's stages and the detector's heads.

The backbone's body runs stage by stage (:class:`FeatureBody`, from its declared
:class:`~detkit.backbones.FeatureStages`) and hands the neck the last map at each of the strides it reads
(C2-C5 at strides 4-32 by default). FPN (Sec. 3) adds a 1x1 lateral convolution to each, merges them top
down (the coarser map upsampled by nearest neighbour to the finer one's size, then added) and smooths each
sum with a 3x3 convolution, all ``out_channels`` (256) wide: P2-P5. P6, for the RPN's largest anchors only
(Sec. 4.1), is P5 subsampled by a stride-2 max pool (``extra_levels`` such maps). The RoI heads pool from the
maps built from the backbone (``roi_levels``), the RPN from all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import FeatureInfo, FeatureStages
from detkit.config import ConfigError, ranged


@dataclass
class FPNSettings:
    """The ``fpn`` neck's config keys."""

    in_strides: list[int] = ranged(default_factory=lambda: [4, 8, 16, 32], ge=1)  # C2-C5: the maps read, by stride
    out_channels: int = ranged(256, ge=1)
    extra_levels: int = ranged(1, ge=0)  # P6 (and beyond) by stride-2 max pooling of the top map, for the RPN only


class FeatureBody(nn.Module):
    """The backbone's stages run in order; returns the outputs of the stages ``indices`` selects (in
    increasing order), and stops after the last of them."""

    def __init__(self, stages: FeatureStages, indices: list[int]):
        super().__init__()
        self.stages = nn.ModuleList(stages.stages[: max(indices) + 1])
        self.indices = list(indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.indices:
                out.append(x)
        return out


class FeaturePyramid(nn.Module):
    """``[C_i (B, c_i, H / s_i, W / s_i)]`` (finest first) -> ``[P_i (B, out_channels, H / s_i, W / s_i)]`` plus
    ``extra_levels`` coarser maps. ``in_indices``: the backbone stages read; ``out_info``: the maps produced;
    ``roi_levels``: how many of them (from the finest) the RoI heads pool from."""

    def __init__(self, stages: FeatureStages, settings: FPNSettings, backbone: str = "the backbone"):
        super().__init__()
        last = stages.last_at_each_stride()
        missing = [s for s in settings.in_strides if s not in last]
        if missing or sorted(settings.in_strides) != list(settings.in_strides):
            have = ", ".join(f"{i.name} (stride {i.stride}, {i.channels} channels)" for i in stages.info)
            raise ConfigError(f"model.neck: FPN reads maps at strides {settings.in_strides} (increasing), and "
                              f"{backbone} has no map at stride {missing}; its stages: {have} "
                              f"(set model.neck.in_strides to strides it has)")
        if settings.out_channels < 1 or settings.extra_levels < 0:
            raise ConfigError(f"model.neck: out_channels={settings.out_channels}, extra_levels="
                              f"{settings.extra_levels}: expected a positive width and a count >= 0")
        self.in_indices = [last[s] for s in settings.in_strides]
        c = settings.out_channels
        self.lateral = nn.ModuleList(nn.Conv2d(stages.info[i].channels, c, 1) for i in self.in_indices)
        self.output = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in self.in_indices)
        for conv in [*self.lateral, *self.output]:  # Detectron2 and torchvision: kaiming_uniform(a=1), bias 0
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        self.extra_levels = settings.extra_levels
        top = settings.in_strides[-1]
        self.out_info = [FeatureInfo(f"p{s.bit_length() - 1}", c, s) for s in settings.in_strides] + \
            [FeatureInfo(f"p{(top << k).bit_length() - 1}", c, top << k) for k in range(1, self.extra_levels + 1)]
        self.roi_levels = len(settings.in_strides)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        laterals = [conv(m) for conv, m in zip(self.lateral, maps)]
        merged = [laterals[-1]]
        for lateral in laterals[-2::-1]:  # top-down: coarse to fine
            merged.insert(0, lateral + F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest"))
        out = [conv(m) for conv, m in zip(self.output, merged)]
        for _ in range(self.extra_levels):
            out.append(F.max_pool2d(out[-1], kernel_size=1, stride=2))
        return out


class WithNeck(nn.Module):
    """The detector's trunk when a neck is used: the backbone's body, then the neck; returns the neck's maps
    (finest first)."""

    def __init__(self, body: FeatureBody, neck: nn.Module):
        super().__init__()
        self.body = body
        self.neck = neck

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.neck(self.body(x))
