"""The protocol every proposal source follows (RPN, selective search, boxes computed elsewhere).

A proposal source is the detector's first stage (R-CNN Sec. 2.1, Faster R-CNN Sec. 3.1). Proposals
reach the detector by one route: a batch may carry boxes per image in original-image pixels (from a
per-dataset cache, see :meth:`ProposalSource.dataset_proposals`); the detector rescales whatever boxes
it has once, to the resized images, and hands them to the source's ``forward``, which returns the
proposals the RoI heads take. A source that computes nothing from features (selective search) makes
boxes from the images themselves in :meth:`ProposalSource.propose` when the batch has none.
"""
from __future__ import annotations

from torch import Tensor, nn


class ProposalSource(nn.Module):
    """Base class of proposal sources; a registered source's builder returns one.

    ``forward(images: ImageList, features (B, C, H, W), targets | None, given | None, phase | None)``
    returns ``(proposals list[Tensor[N_i, 4]], losses dict)`` in resized-image pixels. ``given`` are the
    boxes the batch carried (or :meth:`propose` made), already in resized-image pixels; ``phase``
    ("train" | "test", None: the module's mode) chooses between training and test-time settings, so a
    caller can ask a trained source for its training proposals without changing any setting.
    """

    #: proposals computed in the network from anchors, as the RPN does (``head``, ``anchor_generators``,
    #: ``box_coder``, ``cfg``): the exported graph (``detkit.export.graph``) can hold such a source
    anchor_based: bool = False

    def propose(self, images: list[Tensor]) -> list[Tensor] | None:
        """Boxes made from the images alone, ``Tensor[N_i, 4]`` in their pixels (``images``: ``(3, H_i, W_i)``
        uint8 or [0, 1] float); None for a source that computes its proposals from features (the RPN)."""
        return None

    def dataset_proposals(self, dataset, progress: bool = True, compute: bool = True, num_workers=None):
        """A per-dataset store of this source's boxes (``get(index) -> (N, 4)`` original pixels, and a
        ``fingerprint``), computed where missing when ``compute``; None for a source that needs none."""
        return None
