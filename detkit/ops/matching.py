"""Assigning ground truth to anchors/proposals, and sampling mini-batches.

The matcher implements the labelling rules of the RPN (Faster R-CNN Sec. 3.1.2:
IoU >= 0.7 positive, < 0.3 negative, and the anchor with the highest IoU for
each ground-truth box positive) and of the RoI head (Fast R-CNN Sec. 2.3:
IoU >= 0.5 foreground, [0.1, 0.5) background). The sampler draws a fixed-size
mini-batch with at most a given fraction of positives.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Labels each prediction (column of an IoU matrix) with a ground-truth index.

    Returns ``matches (M,)`` int64: the matched gt index for positives,
    ``BELOW_LOW_THRESHOLD`` (-1) for negatives and ``BETWEEN_THRESHOLDS`` (-2)
    for those that are ignored.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, low_threshold_floor: float | None = None,
                 allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high = high_threshold
        self.low = low_threshold
        # Below this floor a prediction is ignored rather than negative (Fast R-CNN's bg_lo = 0.1).
        self.floor = low_threshold_floor
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou: ``(G, M)`` IoU of G ground-truth boxes with M predictions."""
        if iou.numel() == 0:
            return torch.full((iou.shape[1],), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        best_iou, matches = iou.max(dim=0)
        original = matches.clone()
        matches[best_iou < self.high] = self.BETWEEN_THRESHOLDS
        matches[best_iou < self.low] = self.BELOW_LOW_THRESHOLD
        if self.floor is not None:
            matches[best_iou < self.floor] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            # Each gt's best predictions (ties included) become positives, even below `high`.
            # A mask rather than nonzero() indices: no data-dependent shape, so no host-device synchronisation.
            best_per_gt = iou.max(dim=1, keepdim=True).values
            low_quality = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)
            matches = torch.where(low_quality, original, matches)
        return matches


class BalancedSampler:
    """Samples ``batch_size`` labels per image with at most ``positive_fraction`` positives.

    ``labels`` per image: 1 positive, 0 negative, -1 ignore. Returns boolean masks
    ``(pos, neg)`` of the same shape. Missing positives are filled with negatives.
    """

    def __init__(self, batch_size: int, positive_fraction: float):
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction

    def __call__(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        positive = torch.nonzero(labels >= 1).squeeze(1)
        negative = torch.nonzero(labels == 0).squeeze(1)
        num_pos = min(int(self.batch_size * self.positive_fraction), positive.numel())
        num_neg = min(self.batch_size - num_pos, negative.numel())
        perm_pos = torch.randperm(positive.numel(), device="cpu", generator=generator)[:num_pos].to(labels.device)
        perm_neg = torch.randperm(negative.numel(), device="cpu", generator=generator)[:num_neg].to(labels.device)
        pos_mask = torch.zeros_like(labels, dtype=torch.bool)
        neg_mask = torch.zeros_like(labels, dtype=torch.bool)
        pos_mask[positive[perm_pos]] = True
        neg_mask[negative[perm_neg]] = True
        return pos_mask, neg_mask
