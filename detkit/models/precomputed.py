"""Proposal sources that do not learn: selective search (Uijlings et al. 2013), as used by R-CNN
(Sec. 2.1), SPP-net (Sec. 4.1) and Fast R-CNN (Sec. 4.1).

Training and evaluation read boxes from the per-dataset cache that ``detkit proposals compute``
writes (the trainer attaches it to the dataset, and the detector receives the boxes with the batch);
images without cached boxes (``detkit infer`` on new pictures) are searched on the fly.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from detkit.config import SelectiveSearchConfig


class PrecomputedProposals(nn.Module):
    """Hands boxes computed elsewhere (a proposal cache attached to the dataset: the RPN proposals of
    4-step training, or any user's) to the RoI heads, in resized-image coordinates."""

    needs_proposals = True  # the detector must hand this source boxes

    def __init__(self, top_k: int | None = None):
        super().__init__()
        self.top_k = top_k

    def propose(self, images: list[Tensor]) -> list[Tensor]:
        raise ValueError("precomputed proposals: these images have no boxes (attach a proposal cache to the "
                         "dataset, or use a proposal generator that computes its own)")

    def forward(self, images, features: Tensor, targets=None, precomputed: list[Tensor] | None = None):
        if precomputed is None:
            self.propose([])
        return [p[: self.top_k] for p in precomputed], {}


class SelectiveSearchProposals(PrecomputedProposals):
    """Selective-search boxes (cached, or searched on the fly for new images), ``top_k`` per image."""

    def __init__(self, cfg: SelectiveSearchConfig):
        super().__init__(cfg.top_k)
        self.cfg = cfg

    def settings(self) -> dict:
        """What the cached boxes depend on (the cache's fingerprint includes it)."""
        c = self.cfg
        return {"mode": c.mode, "max_side": c.max_side, "min_size": c.min_size, "top_k": c.top_k}

    def propose(self, images: list[Tensor]) -> list[Tensor]:
        """Selective search on ``(3, H, W)`` uint8 (or [0, 1] float) images; boxes in their coordinates."""
        from detkit.proposals.selective_search import selective_search

        out = []
        for img in images:
            arr = img.detach().cpu()
            if arr.dtype != torch.uint8:
                arr = (arr.float().clamp(0, 1) * 255).round().to(torch.uint8)
            arr = np.ascontiguousarray(arr.permute(1, 2, 0).numpy())
            boxes = selective_search(arr, mode=self.cfg.mode, max_side=self.cfg.max_side,
                                     min_size=self.cfg.min_size, top_k=self.cfg.top_k)
            out.append(torch.as_tensor(boxes, dtype=torch.float32, device=img.device))
        return out
