"""Detector input/output transform (Fast R-CNN Sec. 2.3, Faster R-CNN Sec. 3.3).

Images are rescaled so the shorter side is ``min_size`` (600 in the papers)
unless the longer side would exceed ``max_size`` (1000), normalised with the
backbone's mean/std and zero-padded into one batch tensor whose sides are
multiples of ``size_divisible``. Detections are mapped back to the original
image's coordinates by the inverse of the scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ImageList:
    """A padded batch ``tensors (B, 3, H, W)``; ``image_sizes[i] = (h, w)`` of image i after
    resizing (its valid region), ``scales[i]`` the factor from the original image, whose size is
    ``original_sizes[i]``."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]
    scales: list[float]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)

    def to(self, device) -> "ImageList":
        return ImageList(self.tensors.to(device, non_blocking=True), self.image_sizes, self.scales,
                         self.original_sizes)


def resized_side(length: int, scale: float) -> int:
    """A side of ``length`` pixels scaled by ``scale``, rounded half up (not Python's half to even: the
    exported graph computes ``floor(length * scale + 0.5)``, which ONNX can express)."""
    return max(1, int(math.floor(length * scale + 0.5)))


class DetectionTransform(nn.Module):
    def __init__(self, min_size: int | list[int], max_size: int, mean: list[float], std: list[float],
                 size_divisible: int, in_channels: int = 3):
        super().__init__()
        # Backbones for grayscale input (LeNet-5, the MNIST network) get the images' luma.
        self.in_channels = in_channels
        self.min_sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        self.max_size = max_size
        self.size_divisible = max(1, int(size_divisible))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def scale_for(self, height: int, width: int, min_size: int) -> float:
        """The resize factor; ``min_size <= 0`` keeps the image's own size (R-CNN warps from the original)."""
        if min_size <= 0:
            return 1.0
        short, long = min(height, width), max(height, width)
        scale = min_size / short
        if long * scale > self.max_size:
            scale = self.max_size / long
        return scale

    def forward(self, images: list[Tensor], targets: list[dict] | None = None, min_size: int | None = None):
        """images: ``(3, H_i, W_i)`` uint8 (0-255) or float (0-1), on the model's device; ``min_size``
        overrides the configured shorter side (multi-scale testing).
        Returns ``(ImageList, targets with boxes rescaled)``."""
        resized, sizes, scales, original_sizes = [], [], [], []
        out_targets = [] if targets is not None else None
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got shape {tuple(img.shape)}")
            img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
            if self.in_channels == 1:
                img = (img * img.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
            h, w = img.shape[-2:]
            original_sizes.append((h, w))
            # Multi-scale training draws the shorter side per image (SPP-net / Fast R-CNN Sec. 5.2).
            # torch's RNG (not Python's) so a resumed run draws the same sizes.
            if min_size is not None:
                side = min_size
            elif self.training:
                side = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
            else:
                side = self.min_sizes[-1]
            scale = self.scale_for(h, w, side)
            nh, nw = resized_side(h, scale), resized_side(w, scale)
            img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            img = (img - self.mean) / self.std
            resized.append(img)
            sizes.append((nh, nw))
            scales.append(scale)
            if targets is not None:
                t = dict(targets[i])
                # Separate x and y factors: rounding makes them differ slightly. Python scalars, not a tensor
                # made on the host: no copy to the device, so no synchronisation.
                boxes, fx, fy = t["boxes"], nw / w, nh / h
                t["boxes"] = torch.stack([boxes[:, 0] * fx, boxes[:, 1] * fy, boxes[:, 2] * fx, boxes[:, 3] * fy], 1)
                out_targets.append(t)
        d = self.size_divisible
        max_h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        max_w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = resized[0].new_zeros((len(resized), self.in_channels, max_h, max_w))
        for img, pad in zip(resized, batch):
            pad[:, : img.shape[1], : img.shape[2]].copy_(img)
        return ImageList(batch, sizes, scales, original_sizes), out_targets

    @staticmethod
    def postprocess(detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Rescale detection boxes from resized to original image coordinates."""
        for det, (h, w), (oh, ow) in zip(detections, image_sizes, original_sizes):
            factor = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=det["boxes"].device,
                                  dtype=det["boxes"].dtype)
            det["boxes"] = (det["boxes"] * factor).clamp_(min=0)
            det["boxes"][:, 0::2].clamp_(max=ow)
            det["boxes"][:, 1::2].clamp_(max=oh)
        return detections
