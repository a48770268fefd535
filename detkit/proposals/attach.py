"""Handing a dataset the boxes its detector's proposal source keeps per dataset (R-CNN Sec. 2.1, SPP-net
Sec. 4.1, Fast R-CNN Sec. 2: selective search computed once per image, outside the network), for training
and evaluation alike."""
from __future__ import annotations

from torch import nn

from detkit.engine.distributed import DistInfo, barrier


def attach_proposals(dataset, model: nn.Module, progress: bool = True, info: DistInfo | None = None) -> None:
    """Give ``dataset`` the per-dataset boxes of ``model``'s proposal source
    (:meth:`~detkit.models.proposal_source.ProposalSource.dataset_proposals`), computing the missing ones
    (rank 0 computes, the other ranks wait and read). Does nothing for a source that keeps none (the RPN),
    or for a dataset that has its proposals already, or for a model without a proposal source of its own
    (an exported detector: its proposals are inside its graph)."""
    source = getattr(model, "proposal_generator", None)
    if source is None or getattr(dataset, "proposals", None) is not None:
        return
    info = info or DistInfo()
    store = source.dataset_proposals(dataset, progress=progress) if info.is_main else None
    barrier(info)
    if not info.is_main:
        store = source.dataset_proposals(dataset, compute=False)
    if store is not None:
        dataset.proposals = store
