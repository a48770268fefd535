"""Cascade R-CNN's RoI heads (Cai and Vasconcelos, CVPR 2018, Sec. 4).

A sequence of stages, each a box head and a box predictor of its own trained at a higher IoU threshold
(0.5, 0.6, 0.7) than the one before, on the boxes the stage before it refined. Stage ``t`` samples its RoIs
from stage ``t - 1``'s refined boxes with the ground truth added (as the first stage does from the
proposals), labels them at its own threshold, and regresses them with targets normalised by its own box
coder weights (the paper's standard deviations 0.1/0.2, 0.05/0.1, 0.033/0.067: weights 10/5, 20/10, 30/15);
its losses count with weight 1, 0.5, 0.25. At test time every stage classifies the boxes it is handed; the
detections are the last stage's boxes scored by the mean of the stages' class probabilities.

Each stage's sampling, targets, loss and the final post-processing are detkit's own single-head steps
(:class:`detkit.models.roi_heads.RoIHeads`), one instance per stage with that stage's settings; what the
cascade adds is the loop, the refinement between stages and the score average.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn

from detkit.config import ConfigError, ranged
from detkit.models.roi_heads import RoIHeads, RoIHeadsSettings, SoftmaxBoxHead
from detkit.ops import box_iou, clip_boxes

log = logging.getLogger(__name__)

# RoIHeadsSettings keys every stage sets for itself (from the stage_* lists); the cascade shares the rest.
PER_STAGE = ("fg_iou_thresh", "bg_iou_thresh_hi", "box_coder_weights")
IOU_MARKS = (0.5, 0.6, 0.7, 0.8, 0.9)  # the IoU levels the per-stage statistics count boxes at


def _shared_fields():
    for f in dataclasses.fields(RoIHeadsSettings):
        if f.name not in PER_STAGE:
            yield f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                    metadata=f.metadata)


CascadeSettings = dataclasses.make_dataclass("CascadeSettings", [
    *_shared_fields(),
    # One entry per stage (the lists must be as long as each other): the IoU at or above which a box is a
    # positive (below it, down to bg_iou_thresh_lo, a negative), the weight of the stage's losses, and the
    # weights (wx, wy, ww, wh) its regression targets are multiplied by.
    ("stage_iou_thresholds", "list[float]", ranged(default_factory=lambda: [0.5, 0.6, 0.7], ge=0, le=1)),
    ("stage_loss_weights", "list[float]", ranged(default_factory=lambda: [1.0, 0.5, 0.25], ge=0)),
    ("stage_box_coder_weights", "list[list[float]]", dataclasses.field(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]])),
    # Training iterations between the log lines of each stage's sampled boxes' IoUs and positives (0: none).
    ("stats_period", "int", ranged(100, ge=0)),
])
CascadeSettings.__module__ = __name__
CascadeSettings.__doc__ = (
    "``model.roi_heads`` of ``cascade_rcnn``: the keys of the two-stage detectors' ``model.roi_heads`` (sampling, "
    "loss, test-time post-processing), less fg_iou_thresh, bg_iou_thresh_hi and box_coder_weights, which each "
    "stage takes from the stage_* lists (Cascade R-CNN Sec. 4: IoU 0.5/0.6/0.7, loss weights 1/0.5/0.25, coder "
    "weights 10/5, 20/10, 30/15).")


def check_settings(s) -> int:
    """The number of stages ``s`` describes; a ConfigError naming the key when its lists disagree."""
    n = len(s.stage_iou_thresholds)
    if n < 1:
        raise ConfigError("model.roi_heads.stage_iou_thresholds: expected one IoU threshold per stage, got none")
    for key in ("stage_loss_weights", "stage_box_coder_weights"):
        if len(getattr(s, key)) != n:
            raise ConfigError(f"model.roi_heads.{key}: expected {n} entries, one per stage of "
                              f"stage_iou_thresholds={s.stage_iou_thresholds}, got {len(getattr(s, key))}")
    for k, weights in enumerate(s.stage_box_coder_weights):
        if len(weights) != 4 or not all(w > 0 for w in weights):
            raise ConfigError(f"model.roi_heads.stage_box_coder_weights[{k}]={weights}: expected four positive "
                              f"numbers (wx, wy, ww, wh)")
    for k, iou in enumerate(s.stage_iou_thresholds):
        if iou < s.bg_iou_thresh_lo:
            raise ConfigError(f"model.roi_heads.stage_iou_thresholds[{k}]={iou} is below bg_iou_thresh_lo="
                              f"{s.bg_iou_thresh_lo}: a stage's negatives lie in [bg_iou_thresh_lo, its threshold)")
    return n


def stage_settings(s, k: int) -> RoIHeadsSettings:
    """The single-head settings of stage ``k``: the shared keys, and the stage's threshold and coder weights."""
    shared = {f.name: getattr(s, f.name) for f in dataclasses.fields(RoIHeadsSettings) if f.name not in PER_STAGE}
    iou = s.stage_iou_thresholds[k]
    return RoIHeadsSettings(**shared, fg_iou_thresh=iou, bg_iou_thresh_hi=iou,
                            box_coder_weights=list(s.stage_box_coder_weights[k]))


class SoftmaxBoxAgnostic(SoftmaxBoxHead):
    """Scores over the K+1 classes and one box regression for all of them (class-agnostic, as Cascade R-CNN
    regresses). The deltas are handed on as ``(R, 4(K+1))``, the same four for every class, so any RoI heads
    read this predictor as they read a class-specific one (a Faster R-CNN may use it too)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__(in_features, num_classes, dropout)
        self.bbox_pred = nn.Linear(in_features, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        self.num_classes = num_classes

    def forward(self, x: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        class_logits, deltas = super().forward(x, pooled)
        return class_logits, deltas.repeat(1, self.num_classes + 1)


class StageModules(nn.ModuleList):
    """One module per stage, called as ``modules(stage, *inputs)`` (so that hooks on it see every stage)."""

    def forward(self, stage: int, *inputs):
        return self[stage](*inputs)


class _GivenScores(nn.Module):
    """The predictor a stage's post-processing sees: the scores it is handed are already probabilities (the
    stages' mean)."""

    @staticmethod
    def class_scores(scores: Tensor) -> Tensor:
        return scores


class CascadeRoIHeads(nn.Module):
    """``forward(features, proposals, image_sizes, targets)`` as :class:`~detkit.models.roi_heads.RoIHeads`:
    ``(detections, losses)``, detections in resized-image coordinates, losses ``roi/stage<t>/cls`` and
    ``roi/stage<t>/box_reg``. ``box_head`` and ``predictor`` hold one module per stage; ``stages`` the
    single-head rules (matcher, sampler, box coder, loss, post-processing) of each stage."""

    def __init__(self, settings, roi_extractor: nn.Module, box_heads: list[nn.Module], predictors: list[nn.Module],
                 num_classes: int):
        super().__init__()
        n = check_settings(settings)
        if not len(box_heads) == len(predictors) == n:
            raise ValueError(f"cascade: {n} stages need {n} box heads and predictors, got {len(box_heads)} and "
                             f"{len(predictors)}")
        self.cfg = settings
        self.num_classes = num_classes
        self.roi_extractor = roi_extractor
        self.box_head = StageModules(box_heads)
        self.predictor = StageModules(predictors)
        self.stages = nn.ModuleList(RoIHeads(stage_settings(settings, k), None, None, _GivenScores(), num_classes)
                                    for k in range(n))
        # Per stage: sampled boxes (the added ground truth left out) at IoU >= each of IOU_MARKS, sampled boxes,
        # positives, images. A plain tensor on the features' device, neither saved nor broadcast.
        self.stage_counts = torch.zeros(n, len(IOU_MARKS) + 3)
        self._steps = 0

    def forward(self, features, proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("RoI heads in training mode need targets")
        boxes, losses, score_sum, added = proposals, {}, None, None
        last = len(self.stages) - 1
        for k in range(len(self.stages)):
            labels = None
            if self.training:
                boxes, labels, target_deltas, added = self.sample(k, boxes, targets)
            pooled = self.roi_extractor(features, boxes, image_sizes)
            class_logits, box_deltas = self.predictor(k, self.box_head(k, pooled), pooled.flatten(1))
            if self.training:
                losses.update(self.stage_loss(k, class_logits, box_deltas, labels, target_deltas))
            else:
                scores = self.predictor[k].class_scores(class_logits)
                score_sum = scores if score_sum is None else score_sum + scores
            if k < last:
                boxes = self.refine(k, boxes, class_logits, box_deltas, labels, image_sizes, added)
        if self.training:
            self._log_stage_counts()
            return [], losses
        return self.stages[last].postprocess(score_sum / len(self.stages), box_deltas, boxes, image_sizes), {}

    def sample(self, k: int, boxes: list[Tensor], targets: list[dict]):
        """Stage ``k``'s training RoIs from its input boxes (the ground truth added), labelled at its IoU
        threshold, their regression targets, and per image which of them are the added ground-truth boxes.
        Seeded targets draw each stage's sample from a stream of its own (stage 0 from the single-head
        detector's)."""
        if k:
            targets = [t if t.get("sample_seed") is None else
                       {**t, "sample_seed": (int(t["sample_seed"]) + k * 0x9E3779B97F4A7C15) % 2**62}
                       for t in targets]
        sampled, labels, target_deltas = self.stages[k].select_training_samples(boxes, targets)
        added = [(b[:, None] == t["boxes"][None].to(b.dtype)).all(dim=2).any(dim=1)
                 if self.cfg.add_gt_as_proposals and t["boxes"].numel() else b.new_zeros(len(b), dtype=torch.bool)
                 for b, t in zip(sampled, targets)]
        self._count(k, sampled, added, labels, targets)
        return sampled, labels, target_deltas, added

    def stage_loss(self, k: int, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, target_deltas: Tensor):
        weight = self.cfg.stage_loss_weights[k]
        losses = self.stages[k].compute_loss(class_logits, box_deltas, labels, target_deltas)
        return {f"roi/stage{k + 1}/{name.split('/', 1)[1]}": weight * value for name, value in losses.items()}

    @torch.no_grad()
    def refine(self, k: int, boxes: list[Tensor], class_logits: Tensor, box_deltas: Tensor, labels: Tensor | None,
               image_sizes, added: list[Tensor] | None) -> list[Tensor]:
        """Stage ``k``'s boxes moved by its regression (of the true class for a training positive, else of its
        best-scoring class), clipped to the image, without gradient. In training the ground-truth boxes its
        sampling ``added`` are left out: the next stage adds them again."""
        classes = class_logits[:, 1:].argmax(dim=1) + 1
        if labels is not None:
            classes = torch.where(labels > 0, labels, classes)
        rows = torch.arange(box_deltas.shape[0], device=box_deltas.device)
        deltas = box_deltas.view(box_deltas.shape[0], -1, 4)[rows, classes].float()
        refined = self.stages[k].box_coder.decode(deltas, torch.cat(boxes).float())
        out = [clip_boxes(r, size) for r, size in zip(refined.split([len(b) for b in boxes]), image_sizes)]
        return out if added is None else [r[~a] for r, a in zip(out, added)]

    @torch.no_grad()
    def _count(self, k: int, sampled: list[Tensor], added: list[Tensor], labels: Tensor, targets: list[dict]) -> None:
        """Add stage ``k``'s training sample to the statistics: the IoU of each sampled box (the added ground
        truth left out) with its best-matching ground truth, and the positives (ground truth included)."""
        ious = torch.cat([box_iou(b[~a], t["boxes"].to(b.dtype)).max(dim=1).values if t["boxes"].numel()
                          else b.new_zeros(len(b))[~a] for b, a, t in zip(sampled, added, targets)])
        if self.stage_counts.device != ious.device:
            self.stage_counts = self.stage_counts.to(ious.device)
        marks = torch.tensor(IOU_MARKS, device=ious.device, dtype=ious.dtype)
        counts = self.stage_counts[k]
        counts[:len(IOU_MARKS)] += (ious[:, None] >= marks).sum(dim=0)
        counts[len(IOU_MARKS)] += ious.numel()
        counts[-2] += (labels > 0).sum()
        counts[-1] += len(sampled)

    def stage_statistics(self) -> list[dict]:
        """Per stage, since the last reset: the share of its sampled training boxes (the added ground truth
        left out) at IoU >= each of IOU_MARKS with their best-matching ground truth, and its positives per image
        (the paper's Fig. 4: the shares rise stage by stage, as each stage samples from boxes the one before
        refined)."""
        rows = []
        for k, c in enumerate(self.stage_counts.tolist()):
            sampled, positives, images = c[len(IOU_MARKS)], c[-2], c[-1]
            rows.append({"stage": k + 1, "iou_threshold": self.cfg.stage_iou_thresholds[k],
                         "sampled_boxes": sampled, "positives_per_image": positives / max(images, 1),
                         **{f"iou>={m:g}": c[i] / max(sampled, 1) for i, m in enumerate(IOU_MARKS)}})
        return rows

    def _log_stage_counts(self) -> None:
        self._steps += 1
        period = self.cfg.stats_period
        if not period or self._steps % period:
            return
        parts = []
        for row in self.stage_statistics():
            shares = "/".join(f"{100 * row[f'iou>={m:g}']:.1f}" for m in IOU_MARKS[:3])
            parts.append(f"stage {row['stage']} (IoU {row['iou_threshold']:g}): {shares}%, "
                         f"{row['positives_per_image']:.1f} positives/image")
        log.info("cascade, last %d iterations: sampled boxes at IoU >= 0.5/0.6/0.7 and positives: %s",
                 period, "; ".join(parts))
        self.stage_counts.zero_()
