"""Region Proposal Network (Ren et al. 2015, Sec. 3.1).

A 3x3 convolution slides over the trunk's feature map; two sibling 1x1
convolutions predict, for each of the k anchors at every position, an
objectness score and four box deltas. Training samples 256 anchors per image
with up to half positives (Sec. 3.1.3); proposals are the top-scoring decoded
anchors after clipping, removal of small boxes and NMS at 0.7 (Sec. 3.3).

Targets that carry a ``sample_seed`` (the trainer sets one per sample from
``train.seed`` and the sample's position in the data stream) have their anchors,
and their RoIs in the RoI heads, drawn from a generator of their own, so a
sample's draw does not depend on which process or batch it lands in.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from detkit.config import ConfigError, ranged
from detkit.models.proposal_source import ProposalSource
from detkit.models.transform import ImageList
from detkit.ops import (AnchorGenerator, BalancedSampler, BoxCoder, Matcher, batched_nms, box_iou, clip_boxes,
                        remove_small_boxes)


#: Which sampler a per-image generator serves (its seed is ``sample_seed * 4 + stream``).
RPN_STREAM, ROI_STREAM = 1, 2


def sample_generators(targets: list[dict], stream: int, device: torch.device) -> list[torch.Generator] | None:
    """One generator per image on ``device``, seeded from the target's ``sample_seed`` and ``stream``;
    None when a target has no ``sample_seed`` (the samplers then draw from the global RNG)."""
    seeds = [t.get("sample_seed") for t in targets]
    if any(s is None for s in seeds):
        return None
    return [torch.Generator(device=device).manual_seed((int(s) * 4 + stream) % 2**63) for s in seeds]


def sample_balanced(labels: Tensor, generators: list[torch.Generator],
                    sampler: BalancedSampler) -> tuple[Tensor, Tensor]:
    """``sampler``'s draw (at most ``batch_size * positive_fraction`` positives, filled up with negatives) for
    each row of ``labels (B, N)`` (1 positive, 0 negative, -1 ignored), row i drawing from ``generators[i]``.

    Returns boolean masks ``pos, neg (B, N)``. Every element gets a uniform key on the labels' device and the
    positives (negatives) with the smallest keys are taken: a uniform subset, batched over the rows, with no
    copy to or from the host.
    """
    n = labels.shape[1]
    keys = torch.stack([torch.rand(n, generator=g, device=labels.device) for g in generators])
    is_pos, is_neg = labels >= 1, labels == 0
    # Keys are < 1: the candidates sort before the 2.0 of the rest, so the taken ones are a prefix.
    pos_idx = torch.where(is_pos, keys, 2.0).topk(min(int(sampler.batch_size * sampler.positive_fraction), n),
                                                  dim=1, largest=False).indices
    pos_take = is_pos.gather(1, pos_idx)
    neg_idx = torch.where(is_neg, keys, 2.0).topk(min(sampler.batch_size, n), dim=1, largest=False).indices
    room = sampler.batch_size - pos_take.sum(1, keepdim=True)
    neg_take = is_neg.gather(1, neg_idx) & (torch.arange(neg_idx.shape[1], device=labels.device) < room)
    return (torch.zeros_like(is_pos).scatter_(1, pos_idx, pos_take),
            torch.zeros_like(is_neg).scatter_(1, neg_idx, neg_take))


@functools.lru_cache(maxsize=16)
def _level_layout(counts: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For levels of ``counts`` anchors one after the other: each level's first index ``(L,)``, and each
    anchor's level and position within it ``(A_total,)``. Cached per image size, as the anchors are: made
    once, no host-to-device copy on every step."""
    sizes = torch.tensor(counts, device=device)
    starts = torch.cumsum(sizes, 0) - sizes
    level = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes, output_size=sum(counts))
    return starts, level, torch.arange(sum(counts), device=device) - starts[level]


def _top_n_per_level(scores: Tensor, counts: list[int], n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n`` best anchors of each level at once: ``scores (B, A_total)`` (levels of ``counts`` anchors one
    after the other) are laid out ``(B, L, max count)`` with -inf padding, so one ``topk`` serves every
    level. Returns scores, anchor indices and level indices, each ``(B, L * k)`` (padding scores -inf)."""
    b, levels = scores.shape[0], len(counts)
    device = scores.device
    starts, level, position = _level_layout(tuple(counts), device)
    width = max(counts)
    padded = scores.new_full((b, levels, width), float("-inf"))
    padded[:, level, position] = scores
    k = min(n, width)
    top_scores, top_pos = padded.topk(k, dim=2)
    # A padded slot's index is clamped onto a real anchor; its -inf score marks it for removal.
    top_idx = (starts[:, None] + top_pos).clamp(max=scores.shape[1] - 1)
    top_levels = torch.arange(levels, device=device)[:, None].expand(levels, k)
    return top_scores.reshape(b, -1), top_idx.reshape(b, -1), top_levels.reshape(1, -1).expand(b, -1)


class RPNHead(nn.Module):
    """``features (B, C, H, W)`` -> ``objectness (B, A, H, W)``, ``deltas (B, 4A, H, W)``."""

    def __init__(self, in_channels: int, mid_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            # The paper initialises new layers from N(0, 0.01^2).
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = F.relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)


@dataclass
class AnchorSettings:
    sizes: list[float] = ranged(default_factory=lambda: [128.0, 256.0, 512.0], gt=0, nonempty=True)
    aspect_ratios: list[float] = ranged(default_factory=lambda: [0.5, 1.0, 2.0], gt=0, nonempty=True)
    # centres at (i + offset) * stride: 0.5 the cell's centre; torchvision and Detectron2 use 0
    offset: float = ranged(0.5, ge=0, le=1)
    round: bool = False  # whole-pixel cell anchors, as torchvision's


@dataclass
class RPNSettings:
    """The ``rpn`` proposal generator's config keys (Faster R-CNN Sec. 3.1.3 and 3.3 as defaults)."""

    conv_channels: int | None = ranged(None, ge=1)  # None: the trunk's channels (512 for VGG-16, as in the paper)
    fg_iou_thresh: float = ranged(0.7, ge=0, le=1)
    bg_iou_thresh: float = ranged(0.3, ge=0, le=1)
    batch_size_per_image: int = ranged(256, ge=1)
    positive_fraction: float = ranged(0.5, ge=0, le=1)
    pre_nms_top_n_train: int = ranged(12000, ge=1)
    post_nms_top_n_train: int = ranged(2000, ge=1)
    pre_nms_top_n_test: int = ranged(6000, ge=1)
    post_nms_top_n_test: int = ranged(300, ge=1)
    nms_thresh: float = ranged(0.7, ge=0, le=1)
    min_size: float = ranged(16.0, ge=0)  # in original-image pixels
    straddle_thresh: float = 0.0  # anchors crossing the border by more are ignored in training; <0 keeps all
    box_loss_weight: float = ranged(1.0, ge=0)
    smooth_l1_beta: float = ranged(1.0 / 9.0, ge=0)
    anchors: AnchorSettings = field(default_factory=AnchorSettings)


class RegionProposalNetwork(ProposalSource):
    """The RPN on one feature map of stride ``strides[0]`` (the paper's), or on a feature pyramid (FPN Sec.
    4.1: one head shared by every level, one anchor size per level with every aspect ratio, the pre-NMS
    top-N taken per level and NMS per level, the post-NMS top-N over all levels of an image)."""

    anchor_based = True

    def __init__(self, cfg: RPNSettings, in_channels: int, strides: int | list[int]):
        super().__init__()
        self.cfg = cfg
        strides = [int(strides)] if isinstance(strides, int) else [int(s) for s in strides]
        a = cfg.anchors
        if len(strides) == 1:
            self.anchor_generators = [AnchorGenerator(a.sizes, a.aspect_ratios, strides[0], a.offset, a.round)]
        elif len(a.sizes) == len(strides):
            self.anchor_generators = [AnchorGenerator([size], a.aspect_ratios, stride, a.offset, a.round)
                                      for size, stride in zip(a.sizes, strides)]
        else:
            raise ConfigError(f"model.proposal_generator.anchors.sizes={list(a.sizes)}: a feature pyramid of "
                              f"{len(strides)} levels (strides {strides}) takes one anchor size per level")
        self.head = RPNHead(in_channels, cfg.conv_channels or in_channels,
                            self.anchor_generators[0].num_anchors_per_location)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(cfg.batch_size_per_image, cfg.positive_fraction)

    def forward(self, images: ImageList, features: Tensor, targets: list[dict] | None = None,
                given: list[Tensor] | None = None, phase: str | None = None):
        """Returns ``(proposals: list[Tensor[N_i, 4]], losses)`` in resized-image pixels; losses are empty at
        inference. ``given`` proposals are not used: the RPN makes its own. ``phase`` ("train" | "test")
        chooses the pre/post-NMS top-N; None: by the module's mode."""
        objectness, deltas, anchors, counts = self.predict(features)
        phase = phase or ("train" if self.training else "test")
        proposals = self.filter_proposals(deltas.detach(), anchors, objectness.detach(), images, phase, counts)

        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets")
            labels, matched_gt = self.assign_targets(anchors, targets, images.image_sizes)
            pos, neg = self.sample(labels, targets)
            losses = self.compute_loss(objectness, deltas, anchors, labels, matched_gt, pos, neg)
        return proposals, losses

    def predict(self, features: Tensor | list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """The head on each map: ``objectness (B, A_total)``, ``deltas (B, A_total, 4)``, ``anchors (A_total, 4)``
        (levels one after the other, each position-major) and the number of anchors of each level."""
        maps = [features] if isinstance(features, Tensor) else list(features)
        if len(maps) != len(self.anchor_generators):
            raise ValueError(f"the RPN was built for {len(self.anchor_generators)} feature maps, got {len(maps)}")
        objectness, deltas, anchors = [], [], []
        for level, generator in zip(maps, self.anchor_generators):
            obj, delta = self.head(level)
            b, a, h, w = obj.shape
            # (B, A, H, W) -> (B, H*W*A), matching the anchor generator's position-major order.
            objectness.append(obj.permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(delta.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
            anchors.append(generator.grid_anchors((h, w), dtype=delta.dtype, device=delta.device))
        counts = [len(a) for a in anchors]
        if len(maps) == 1:
            return objectness[0], deltas[0], anchors[0], counts
        return torch.cat(objectness, 1), torch.cat(deltas, 1), torch.cat(anchors), counts

    def filter_proposals(self, deltas: Tensor, anchors: Tensor, scores: Tensor, images: ImageList,
                         phase: str = "test", counts: list[int] | None = None) -> list[Tensor]:
        """Top-N anchors by objectness, decode, clip, drop small boxes, NMS, top-N again; per image.

        deltas ``(B, A_total, 4)``, anchors ``(A_total, 4)``, scores ``(B, A_total)``; ``counts``: anchors per
        pyramid level (None: one level). Only the top-N anchors are decoded (the rest could never survive).
        ``phase``: the training or the test top-N. Over several levels the pre-NMS top-N is per level and NMS
        runs per level (batched), as in FPN.
        """
        pre_n = self.cfg.pre_nms_top_n_train if phase == "train" else self.cfg.pre_nms_top_n_test
        post_n = self.cfg.post_nms_top_n_train if phase == "train" else self.cfg.post_nms_top_n_test
        if counts is None or len(counts) == 1:
            k = min(pre_n, scores.shape[1])
            top_scores, top_idx = scores.topk(k, dim=1)
            top_levels = None
        else:
            top_scores, top_idx, top_levels = _top_n_per_level(scores, counts, pre_n)
        top_deltas = torch.gather(deltas, 1, top_idx[..., None].expand(-1, -1, 4))
        top_boxes = self.box_coder.decode(top_deltas.reshape(-1, 4), anchors[top_idx.reshape(-1)])
        top_boxes = top_boxes.view(*top_idx.shape, 4)
        result = []
        for i, (img_boxes, img_scores, size, scale) in enumerate(zip(top_boxes, top_scores, images.image_sizes,
                                                                     images.scales)):
            img_boxes = clip_boxes(img_boxes, size)
            keep = remove_small_boxes(img_boxes, self.cfg.min_size * scale)
            if top_levels is None:
                img_boxes, img_scores = img_boxes[keep], img_scores[keep]
                keep = nms(img_boxes, img_scores, self.cfg.nms_thresh)[:post_n]
            else:
                keep = keep[torch.isfinite(img_scores[keep])]  # padding of the levels with fewer anchors
                img_boxes, img_scores, levels = img_boxes[keep], img_scores[keep], top_levels[i][keep]
                keep = batched_nms(img_boxes, img_scores, levels, self.cfg.nms_thresh)[:post_n]
            result.append(img_boxes[keep])
        return result

    def assign_targets(self, anchors: Tensor, targets: list[dict], image_sizes) -> tuple[Tensor, Tensor]:
        """Per image: labels ``(B, N)`` (1 positive, 0 negative, -1 ignored) and matched gt boxes ``(B, N, 4)``.

        With ``straddle_thresh >= 0`` the anchors that cross the image border by more are ignored in training
        (Sec. 3.3) and take no part in the matching: each gt box's best anchor, positive whatever its IoU,
        is its best inside anchor (as py-faster-rcnn's ``anchor_target_layer`` chooses), so a small box in a
        corner is not left without a positive anchor when its best anchor overall crosses the border.
        """
        labels, matched = [], []
        for t, (h, w) in zip(targets, image_sizes):
            gt = t["boxes"]
            inside = None
            if self.cfg.straddle_thresh >= 0:
                s = self.cfg.straddle_thresh
                inside = ((anchors[:, 0] >= -s) & (anchors[:, 1] >= -s)
                          & (anchors[:, 2] < w + s) & (anchors[:, 3] < h + s))
            if gt.numel() == 0:
                lab = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
                box = torch.zeros_like(anchors)
            else:
                iou = box_iou(gt, anchors)
                if inside is not None:
                    # An IoU of -1 is below every threshold and never a gt's best match (the matcher takes
                    # low-quality matches only at IoU > 0). A mask, not indexing: no host-device sync.
                    iou = torch.where(inside, iou, -1.0)
                matches = self.matcher(iou)
                lab = (matches >= 0).to(torch.float32)
                lab[matches == Matcher.BETWEEN_THRESHOLDS] = -1.0
                box = gt[matches.clamp(min=0)]
            if inside is not None:
                lab = torch.where(inside, lab, -1.0)
            labels.append(lab)
            matched.append(box)
        return torch.stack(labels), torch.stack(matched)

    def sample(self, labels: Tensor, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """Masks ``pos, neg (B, N)`` of the anchors in each image's loss (Sec. 3.1.3), drawn with the images'
        own generators when the targets carry ``sample_seed``, else from the global RNG."""
        generators = sample_generators(targets, RPN_STREAM, labels.device)
        if generators is not None:
            return sample_balanced(labels, generators, self.sampler)
        pos, neg = zip(*(self.sampler(lab) for lab in labels))
        return torch.stack(pos), torch.stack(neg)

    def compute_loss(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, labels: Tensor,
                     matched_gt: Tensor, pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
        """Losses over the sampled anchors ``pos | neg``, normalised by their number in the batch."""
        sampled = pos | neg
        num_sampled = sampled.sum().clamp(min=1)
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
        target_deltas = self.box_coder.encode(matched_gt[pos], anchors.expand(labels.shape[0], -1, -1)[pos])
        box_loss = F.smooth_l1_loss(deltas[pos], target_deltas, beta=self.cfg.smooth_l1_beta, reduction="sum")
        return {
            "rpn/objectness": obj_loss / num_sampled,
            "rpn/box_reg": self.cfg.box_loss_weight * box_loss / num_sampled,
        }
