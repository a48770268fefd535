"""Region-of-interest heads of Fast/Faster R-CNN (Girshick 2015, Sec. 2).

Proposals are pooled from the trunk's features (RoI pooling), passed through the
backbone's RoI head (fc6/fc7 for VGG, res5 for ResNet) and a detection head that
outputs scores over K+1 classes and class-specific box deltas. Training samples
128 RoIs per image, 25% foreground (IoU >= 0.5) and background from
[0.1, 0.5), with the ground truth added to the proposals (Sec. 2.3); the loss
is cross-entropy plus smooth-L1 on the true class's deltas (Eq. 1). At test
time boxes are decoded per class, clipped, thresholded at score 0.05 and
suppressed per class, keeping at most 100 per image. Targets with a
``sample_seed`` draw their RoIs from a generator of their own (see
``detkit.models.rpn``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.config import ranged
from detkit.models.rpn import ROI_STREAM, sample_balanced, sample_generators
from detkit.ops import BalancedSampler, BoxCoder, Matcher, batched_nms, box_iou, clip_boxes, remove_small_boxes


@dataclass
class RoIHeadsSettings:
    """``model.roi_heads``, a settings section the two-stage detectors declare: the second stage's own settings
    (torchvision's ``RoIHeads``, Detectron2's ``ROI_HEADS``): training samples (Fast R-CNN Sec. 2.3), box
    targets and loss (Eq. 1-3), test-time post-processing."""

    batch_size_per_image: int = ranged(128, ge=1)
    positive_fraction: float = ranged(0.25, ge=0, le=1)
    fg_iou_thresh: float = ranged(0.5, ge=0, le=1)
    bg_iou_thresh_hi: float = ranged(0.5, ge=0, le=1)
    bg_iou_thresh_lo: float = ranged(0.1, ge=0, le=1)
    add_gt_as_proposals: bool = True
    box_coder_weights: list[float] = ranged(default_factory=lambda: [10.0, 10.0, 5.0, 5.0], gt=0)
    box_loss_weight: float = ranged(1.0, ge=0)
    smooth_l1_beta: float = ranged(1.0, ge=0)
    score_thresh: float = 0.05  # any number: the SVM predictor's scores are margins, not probabilities
    nms_thresh: float = ranged(0.3, ge=0, le=1)
    detections_per_img: int = ranged(100, ge=1)


class BoxPredictor(nn.Module):
    """Base class of box predictors (a registered head's builder returns one).

    ``forward(vectors (R, D), pooled (R, P))`` -> ``class_logits (R, K+1)``, ``box_deltas (R, 4(K+1))``:
    ``vectors`` are the RoI head's output (fc7), ``pooled`` the flattened pooled grid (pool5) for a
    predictor that reads it (R-CNN's ridge regressor).
    """

    def class_scores(self, class_logits: Tensor) -> Tensor:
        """Test-time scores ``(R, K+1)`` from the predictor's outputs: a softmax over the classes."""
        return F.softmax(class_logits.float(), dim=-1)


@dataclass
class SoftmaxBoxSettings:
    """The ``softmax_box`` predictor's config keys."""

    dropout: float = ranged(0.0, ge=0, lt=1)  # dropout on the head's input vectors


class SoftmaxBoxHead(BoxPredictor):
    """``(R, in_features)`` -> ``class_logits (R, K+1)``, ``box_deltas (R, 4(K+1))``."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes + 1))
        # Fast R-CNN Sec. 2.2: N(0, 0.01^2) for classification and N(0, 0.001^2) for regression.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.dropout(x.flatten(1))
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    def __init__(self, cfg: RoIHeadsSettings, roi_extractor: nn.Module, box_head: nn.Module, predictor: nn.Module,
                 num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.roi_extractor = roi_extractor
        self.box_head = box_head
        self.predictor = predictor
        self.num_classes = num_classes
        self.box_coder = BoxCoder(tuple(cfg.box_coder_weights))
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh_hi, low_threshold_floor=cfg.bg_iou_thresh_lo)
        self.sampler = BalancedSampler(cfg.batch_size_per_image, cfg.positive_fraction)

    def forward(self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None):
        """Returns ``(detections, losses)``: detections (inference) in resized-image coordinates."""
        if self.training:
            if targets is None:
                raise ValueError("RoI heads in training mode need targets")
            proposals, labels, target_deltas = self.select_training_samples(proposals, targets)
        class_logits, box_deltas = self.predict(features, proposals, image_sizes)
        if self.training:
            return [], self.compute_loss(class_logits, box_deltas, labels, target_deltas)
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}

    def predict(self, features: Tensor, proposals: list[Tensor], image_sizes) -> tuple[Tensor, Tensor]:
        return self.classify(self.roi_extractor(features, proposals, image_sizes))

    def classify(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled regions ``(R, ...)`` -> ``class_logits (R, K+1)``, ``box_deltas (R, 4(K+1))``: the RoI head's
        vectors and the flattened pooled grid go to the predictor."""
        return self.predictor(self.box_head(pooled), pooled.flatten(1))

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict]):
        """Add gt to proposals, label by IoU and sample a fixed mini-batch per image.

        Returns sampled proposals, their labels (0 = background) and regression targets. When the
        targets carry ``sample_seed``, each image draws with its own generator, else from the global RNG.
        """
        out_props, out_labels, out_deltas = [], [], []
        generators = sample_generators(targets, ROI_STREAM, proposals[0].device) or [None] * len(targets)
        for props, t, generator in zip(proposals, targets, generators):
            gt, gt_labels = t["boxes"], t["labels"]
            if self.cfg.add_gt_as_proposals and gt.numel():
                props = torch.cat([props, gt.to(props.dtype)])
            if gt.numel():
                matches = self.matcher(box_iou(gt, props))
                labels = gt_labels[matches.clamp(min=0)].clone()
                labels[matches == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1
                matched_boxes = gt[matches.clamp(min=0)]
            else:
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched_boxes = props
            if generator is None:
                pos, neg = self.sampler(labels)
            else:
                pos, neg = (mask[0] for mask in sample_balanced(labels[None], [generator], self.sampler))
            keep = pos | neg
            props, labels, matched_boxes = props[keep], labels[keep], matched_boxes[keep]
            out_props.append(props)
            out_labels.append(labels)
            out_deltas.append(self.box_coder.encode(matched_boxes, props))
        return out_props, torch.cat(out_labels), torch.cat(out_deltas)

    def compute_loss(self, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, target_deltas: Tensor):
        cls_loss = F.cross_entropy(class_logits, labels)
        pos = torch.nonzero(labels > 0).squeeze(1)
        # Only the deltas of each foreground RoI's true class are regressed.
        deltas = box_deltas.view(box_deltas.shape[0], -1, 4)[pos, labels[pos]]
        box_loss = F.smooth_l1_loss(deltas, target_deltas[pos], beta=self.cfg.smooth_l1_beta, reduction="sum")
        return {
            "roi/cls": cls_loss,
            "roi/box_reg": self.cfg.box_loss_weight * box_loss / max(1, labels.numel()),
        }

    def postprocess(self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor],
                    image_sizes) -> list[dict]:
        counts = [p.shape[0] for p in proposals]
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals)).view(-1, self.num_classes + 1, 4)
        scores = self.predictor.class_scores(class_logits)
        results = []
        for img_boxes, img_scores, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            img_boxes = clip_boxes(img_boxes, size)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, self.num_classes + 1, device=img_scores.device).repeat(img_scores.shape[0])
            img_scores = img_scores[:, 1:].reshape(-1)
            keep = torch.nonzero(img_scores > self.cfg.score_thresh).squeeze(1)
            img_boxes, img_scores, labels = img_boxes[keep], img_scores[keep], labels[keep]
            keep = remove_small_boxes(img_boxes, 1e-2)
            img_boxes, img_scores, labels = img_boxes[keep], img_scores[keep], labels[keep]
            keep = batched_nms(img_boxes, img_scores, labels, self.cfg.nms_thresh)[: self.cfg.detections_per_img]
            results.append({"boxes": img_boxes[keep], "scores": img_scores[keep], "labels": labels[keep]})
        return results


def _roi_heads(model) -> list[RoIHeads]:
    return [m for m in model.modules() if isinstance(m, RoIHeads)] if isinstance(model, nn.Module) else []


def set_roi_heads(model: nn.Module, **changes) -> int:
    """Change settings (``score_thresh``, ``detections_per_img``...) of every :class:`RoIHeads` of ``model``
    (one, or one per stage of a multi-stage head); returns how many it changed: 0 for a model without detkit
    RoI heads (an exported file, a detector of another shape)."""
    heads = _roi_heads(model)
    if changes:
        for h in heads:
            h.cfg = replace(h.cfg, **changes)
    return len(heads)


@contextlib.contextmanager
def detections_capped(model: nn.Module, count: int) -> Iterator[int]:
    """Inside the block the RoI heads of ``model`` keep at most ``count`` detections per image
    (``detections_per_img``, :func:`set_roi_heads`); their settings are restored after. Yields how many heads
    it set: 0 for a model without detkit RoI heads (an exported file, whose cap was fixed when it was written,
    or a detector of another shape)."""
    heads = _roi_heads(model)
    saved = [h.cfg for h in heads]
    try:
        yield set_roi_heads(model, detections_per_img=int(count))
    finally:
        for h, cfg in zip(heads, saved):
            h.cfg = cfg
