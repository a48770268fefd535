"""Proposal sources that do not learn: selective search (Uijlings et al. 2013), as used by R-CNN
(Sec. 2.1), SPP-net (Sec. 4.1) and Fast R-CNN (Sec. 4.1), and boxes computed elsewhere.

Training and evaluation read boxes from the per-dataset cache (``dataset_proposals``; ``detkit
proposals compute`` fills it ahead of time), and the detector receives them with the batch; images
without cached boxes (``detkit infer`` on new pictures) are searched on the fly (``propose``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detkit.config import ConfigError, ranged
from detkit.models.proposal_source import ProposalSource


@dataclass
class PrecomputedSettings:
    """The ``precomputed`` proposal source's config keys."""

    top_k: int | None = ranged(2000, ge=1)  # boxes per image handed on (the cache's order is kept); None: all


@dataclass
class SelectiveSearchSettings:
    """The ``selective_search`` proposal source's config keys (R-CNN Sec. 2.1: ~2000 boxes per image)."""

    mode: str = "fast"  # fast | quality | rcnn (the R-CNN paper's fast-mode settings)
    max_side: int | None = ranged(500, ge=1)  # the search runs on the image shrunk to this longer side; None: full size
    min_size: float = ranged(0.0, ge=0)  # drop proposals narrower or shorter than this (original-image pixels)
    top_k: int = ranged(2000, ge=1)
    # one sub-directory per dataset and settings; None: the cache root (detkit.proposals.cache.default_cache_root:
    # $DETKIT_CACHE_DIR/proposals, else $XDG_CACHE_HOME/detkit/proposals, else ~/.cache/detkit/proposals)
    cache_dir: str | None = None
    num_workers: int | None = ranged(None, ge=0)  # processes computing the cache (0 or 1: this one); None: all cores


class PrecomputedProposals(ProposalSource):
    """Hands on the boxes the batch carries (a proposal cache attached to the dataset: the RPN proposals
    of 4-step training, or any user's), the first ``top_k`` per image."""

    def __init__(self, top_k: int | None = None):
        super().__init__()
        self.top_k = top_k

    def forward(self, images, features: Tensor, targets=None, given: list[Tensor] | None = None,
                phase: str | None = None):
        if given is None:
            raise ValueError("precomputed proposals: these images have no boxes (attach a proposal cache to the "
                             "dataset, or use a proposal generator that computes its own)")
        return [p[: self.top_k] for p in given], {}


class SelectiveSearchProposals(PrecomputedProposals):
    """Selective-search boxes (cached per dataset, or searched on the fly for new images), ``top_k`` per
    image."""

    def __init__(self, cfg: SelectiveSearchSettings):
        from detkit.proposals.selective_search import check_settings

        super().__init__(cfg.top_k)
        self.cfg = cfg
        try:
            check_settings(cfg.mode, cfg.max_side, cfg.top_k, {})
        except ValueError as exc:
            raise ConfigError(f"model.proposal_generator.{exc}") from None

    def settings(self) -> dict:
        """What the boxes depend on (the cache is named by it)."""
        c = self.cfg
        return {"mode": c.mode, "max_side": c.max_side, "min_size": c.min_size, "top_k": c.top_k}

    def dataset_proposals(self, dataset, progress: bool = True, compute: bool = True, num_workers=None):
        from detkit.proposals.cache import default_cache_root, selective_search_cache

        workers = self.cfg.num_workers if num_workers is None else num_workers
        root = self.cfg.cache_dir or default_cache_root()
        return selective_search_cache(root, dataset, **self.settings(), num_workers=workers,
                                      progress=progress, compute=compute)

    def propose(self, images: list[Tensor]) -> list[Tensor]:
        """Selective search on ``(3, H, W)`` uint8 (or [0, 1] float) images; boxes in their coordinates."""
        from detkit.data.images import to_hwc_uint8
        from detkit.proposals.selective_search import selective_search

        return [torch.as_tensor(selective_search(to_hwc_uint8(img), mode=self.cfg.mode, max_side=self.cfg.max_side,
                                                 min_size=self.cfg.min_size, top_k=self.cfg.top_k),
                                dtype=torch.float32, device=img.device) for img in images]
