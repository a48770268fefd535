"""A detector's proposals for every image of a dataset: one function for ``detkit proposals eval`` (a
trained RPN's recall), for 4-step training (each RPN step's proposals feed the next Fast R-CNN step,
Faster R-CNN Sec. 3.2) and for anything else that needs them. Nothing is changed on the model: the
training-time proposal counts are asked for with ``phase="train"``."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from detkit.data.images import ImageReadError, to_chw_tensor

log = logging.getLogger(__name__)


@torch.no_grad()
def compute_proposals(model: nn.Module, dataset, device: torch.device, phase: str = "test", cache=None,
                      progress: bool = True):
    """``model.region_proposals`` of each image of ``dataset`` (``(N, 4)`` float32, original-image pixels).

    With ``cache`` (a :class:`~detkit.proposals.cache.ProposalCache`), the images it lacks are computed
    into it and the cache is returned; without, the list of arrays. An unreadable image gets the whole-image
    box (logged), as in selective search caches.
    """
    indices = cache.missing() if cache is not None else range(len(dataset))
    model.to(device).eval()
    out = []
    iterator = indices
    if progress:
        from detkit.engine.progress import progress_bar

        iterator = progress_bar(indices, desc=f"proposals ({phase})", unit="img")
    for i in iterator:
        try:
            image, _ = dataset[i]
        except ImageReadError as exc:
            info = dataset.image_info(i)
            log.warning("%s; its proposal is the whole image", exc)
            boxes = np.array([[0, 0, info["width"], info["height"]]], np.float32)
        else:
            boxes = model.region_proposals([to_chw_tensor(image, device)], phase=phase)[0].float().cpu().numpy()
        if cache is not None:
            cache.put(i, boxes)
        else:
            out.append(boxes)
    if cache is None:
        return out
    cache.refresh_complete()
    return cache
