"""Handing a dataset the selective-search boxes its detector takes (R-CNN Sec. 2.1, SPP-net Sec. 4.1,
Fast R-CNN Sec. 2: proposals computed once per image, outside the network), for training and evaluation
alike."""
from __future__ import annotations

from torch import nn

from detkit.config import Config
from detkit.distributed import DistInfo, barrier
from detkit.proposals.cache import selective_search_cache


def attach_proposals(dataset, model: nn.Module, cfg: Config, progress: bool = True,
                     info: DistInfo | None = None) -> None:
    """Give ``dataset`` the selective-search boxes its detector takes, computing the missing ones into the
    per-dataset cache (``model.selective_search``; rank 0 computes, the other ranks wait and read).

    Does nothing for a detector whose proposal source has no ``settings()`` (a learned RPN), or for a
    dataset that has its proposals already.
    """
    generator = getattr(model, "proposal_generator", None)
    if not hasattr(generator, "settings") or getattr(dataset, "proposals", None) is not None:
        return
    info = info or DistInfo()
    ss = cfg.model.selective_search
    settings = generator.settings()  # what the boxes depend on: the cache is named by it
    if info.is_main:
        cache = selective_search_cache(ss.cache_dir, dataset, **settings, num_workers=ss.num_workers,
                                       progress=progress)
    barrier(info)
    if not info.is_main:
        cache = selective_search_cache(ss.cache_dir, dataset, **settings, compute=False)
    dataset.proposals = cache
