"""Region Proposal Network (Ren et al. 2015, Sec. 3.1).

A 3x3 convolution slides over the trunk's feature map; two sibling 1x1
convolutions predict, for each of the k anchors at every position, an
objectness score and four box deltas. Training samples 256 anchors per image
with up to half positives (Sec. 3.1.3); proposals are the top-scoring decoded
anchors after clipping, removal of small boxes and NMS at 0.7 (Sec. 3.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from detkit.config import AnchorConfig, RPNConfig
from detkit.models.transform import ImageList
from detkit.ops import AnchorGenerator, BalancedSampler, BoxCoder, Matcher, box_iou, clip_boxes, remove_small_boxes


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


class RegionProposalNetwork(nn.Module):
    def __init__(self, cfg: RPNConfig, anchors: AnchorConfig, in_channels: int, stride: int):
        super().__init__()
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(anchors.sizes, anchors.aspect_ratios, stride)
        self.head = RPNHead(in_channels, cfg.conv_channels or in_channels,
                            self.anchor_generator.num_anchors_per_location)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(cfg.batch_size_per_image, cfg.positive_fraction)

    def forward(self, images: ImageList, features: Tensor, targets: list[dict] | None = None,
                precomputed: list[Tensor] | None = None):
        """Returns ``(proposals: list[Tensor[N_i, 4]], losses)``; losses are empty at inference.
        ``precomputed`` proposals are not used: the RPN makes its own."""
        objectness, deltas = self.head(features)
        b, a, h, w = objectness.shape
        # (B, A, H, W) -> (B, H*W*A), matching the anchor generator's position-major order.
        objectness = objectness.permute(0, 2, 3, 1).reshape(b, -1)
        deltas = deltas.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
        anchors = self.anchor_generator.grid_anchors((h, w), dtype=deltas.dtype, device=deltas.device)

        proposals = self.filter_proposals(deltas.detach(), anchors, objectness.detach(), images)

        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets")
            labels, matched_gt = self.assign_targets(anchors, targets, images.image_sizes)
            losses = self.compute_loss(objectness, deltas, anchors, labels, matched_gt)
        return proposals, losses

    def filter_proposals(self, deltas: Tensor, anchors: Tensor, scores: Tensor, images: ImageList) -> list[Tensor]:
        """Top-N anchors by objectness, decode, clip, drop small boxes, NMS, top-N again; per image.

        deltas ``(B, A_total, 4)``, anchors ``(A_total, 4)``, scores ``(B, A_total)``. Only the top-N
        anchors are decoded (the rest could never survive).
        """
        pre_n = self.cfg.pre_nms_top_n_train if self.training else self.cfg.pre_nms_top_n_test
        post_n = self.cfg.post_nms_top_n_train if self.training else self.cfg.post_nms_top_n_test
        k = min(pre_n, scores.shape[1])
        top_scores, top_idx = scores.topk(k, dim=1)
        top_deltas = torch.gather(deltas, 1, top_idx[..., None].expand(-1, -1, 4))
        top_boxes = self.box_coder.decode(top_deltas.reshape(-1, 4), anchors[top_idx.reshape(-1)]).view(-1, k, 4)
        result = []
        for img_boxes, img_scores, size, scale in zip(top_boxes, top_scores, images.image_sizes, images.scales):
            img_boxes = clip_boxes(img_boxes, size)
            keep = remove_small_boxes(img_boxes, self.cfg.min_size * scale)
            img_boxes, img_scores = img_boxes[keep], img_scores[keep]
            keep = nms(img_boxes, img_scores, self.cfg.nms_thresh)[:post_n]
            result.append(img_boxes[keep])
        return result

    def assign_targets(self, anchors: Tensor, targets: list[dict], image_sizes) -> tuple[Tensor, Tensor]:
        """Per image: labels ``(B, N)`` (1 positive, 0 negative, -1 ignored) and matched gt boxes ``(B, N, 4)``."""
        labels, matched = [], []
        for t, (h, w) in zip(targets, image_sizes):
            gt = t["boxes"]
            if gt.numel() == 0:
                lab = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
                box = torch.zeros_like(anchors)
            else:
                matches = self.matcher(box_iou(gt, anchors))
                lab = (matches >= 0).to(torch.float32)
                lab[matches == Matcher.BETWEEN_THRESHOLDS] = -1.0
                box = gt[matches.clamp(min=0)]
            if self.cfg.straddle_thresh >= 0:
                # The paper ignores cross-boundary anchors in training (Sec. 3.3).
                s = self.cfg.straddle_thresh
                inside = ((anchors[:, 0] >= -s) & (anchors[:, 1] >= -s)
                          & (anchors[:, 2] < w + s) & (anchors[:, 3] < h + s))
                lab[~inside] = -1.0
            labels.append(lab)
            matched.append(box)
        return torch.stack(labels), torch.stack(matched)

    def compute_loss(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, labels: Tensor,
                     matched_gt: Tensor) -> dict[str, Tensor]:
        pos_masks, neg_masks = zip(*(self.sampler(lab) for lab in labels))
        pos = torch.stack(pos_masks)
        sampled = pos | torch.stack(neg_masks)
        num_sampled = sampled.sum().clamp(min=1)
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
        target_deltas = self.box_coder.encode(matched_gt[pos], anchors.expand(labels.shape[0], -1, -1)[pos])
        box_loss = F.smooth_l1_loss(deltas[pos], target_deltas, beta=self.cfg.smooth_l1_beta, reduction="sum")
        return {
            "rpn/objectness": obj_loss / num_sampled,
            "rpn/box_reg": self.cfg.box_loss_weight * box_loss / num_sampled,
        }
