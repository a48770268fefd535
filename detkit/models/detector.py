"""Two-stage detector assembly.

The detector only composes the parts it is handed (transform, trunk, proposal
source, RoI heads), as torchvision's ``GeneralizedRCNN`` does: Faster R-CNN is
this class with an RPN as proposal source; Fast R-CNN and SPP-net differ in the
parts, not in this class. Training returns a loss dict with stage-prefixed keys;
inference returns ``list[{"boxes", "scores", "labels"}]`` in original-image
coordinates.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.config import ConfigError, ModelConfig, check_kwargs
from detkit.models.roi_heads import RoIHeads
from detkit.models.rpn import RegionProposalNetwork
from detkit.models.transform import DetectionTransform

log = logging.getLogger(__name__)


class TwoStageDetector(nn.Module):
    def __init__(self, transform: DetectionTransform, trunk: nn.Module, proposal_generator: nn.Module,
                 roi_heads: RoIHeads, class_names: list[str] | None = None):
        super().__init__()
        self.transform = transform
        self.trunk = trunk
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.class_names = list(class_names) if class_names else None
        self.channels_last = False  # set by the trainer (train.channels_last)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None,
                proposals: list[Tensor] | None = None):
        """images: ``(3, H_i, W_i)`` uint8 or float in [0, 1]; targets: ``{"boxes" (N, 4) xyxy, "labels" (N,)}``;
        proposals: precomputed boxes per image (original-image coordinates) for proposal sources that
        take them (selective search caches); the RPN ignores them."""
        if self.training and targets is None:
            raise ValueError("a detector in training mode needs targets")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        batch = image_list.tensors
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.trunk(batch)
        if proposals is not None:
            proposals = [p * torch.tensor([w / ow, h / oh, w / ow, h / oh], device=p.device, dtype=p.dtype)
                         for p, (h, w), (oh, ow) in zip(proposals, image_list.image_sizes, original_sizes)]
        proposals, rpn_losses = self.proposal_generator(image_list, features, targets, proposals)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d with the same statistics.

    Detection batches of 1-2 images make batch statistics useless, so
    pretrained statistics are kept fixed (Detectron, torchvision).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.running_mean is not None:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def build_backbone(cfg: ModelConfig, registries, num_classes: int = 1000):
    """The configured backbone with its weights (if a local file is given)."""
    entry = registries.backbones.get(cfg.backbone.name)
    check_kwargs(entry.builder, {"num_classes": num_classes, **cfg.backbone.args}, "model.backbone.args")
    backbone = entry.builder(num_classes=num_classes, **cfg.backbone.args)
    if cfg.backbone.weights:
        missing = backbone.load_pretrained(cfg.backbone.weights)
        log.info("loaded backbone weights from %s (%d parameters not in the file)", cfg.backbone.weights, len(missing))
    return backbone


def build_two_stage(cfg: ModelConfig, num_classes: int, registries, class_names=None) -> TwoStageDetector:
    """Faster R-CNN (and any other two-stage combination) from a model config."""
    backbone = build_backbone(cfg, registries)
    parts = backbone.detection_parts()
    defaults = backbone.defaults
    frozen_bn = cfg.backbone.frozen_bn if cfg.backbone.frozen_bn is not None else bool(cfg.backbone.weights)
    if frozen_bn:
        freeze_batchnorm(parts.trunk)
        freeze_batchnorm(parts.roi_head)
    if cfg.backbone.freeze_at > len(parts.stages):
        raise ConfigError(f"model.backbone.freeze_at={cfg.backbone.freeze_at}: backbone {cfg.backbone.name!r} "
                          f"has only {len(parts.stages)} trunk stages")
    for stage in parts.stages[: cfg.backbone.freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)

    t = cfg.transform
    transform = DetectionTransform(
        t.min_size, t.max_size, t.mean or list(defaults.mean), t.std or list(defaults.std),
        t.size_divisible or parts.stride, in_channels=defaults.input_size[0],
    )
    rpn_entry = registries.proposal_generators.get(cfg.rpn.name)
    proposal_generator = rpn_entry.builder(cfg=cfg, in_channels=parts.out_channels, stride=parts.stride)

    output_size = cfg.roi_extractor.output_size or defaults.roi_output_size
    ext_entry = registries.roi_extractors.get(cfg.roi_extractor.name)
    extractor = ext_entry.builder(output_size=output_size, stride=parts.stride, cfg=cfg.roi_extractor)
    head_entry = registries.heads.get(cfg.roi_head.name)
    predictor = head_entry.builder(in_features=parts.head_channels, num_classes=num_classes, cfg=cfg.roi_head)
    roi_heads = RoIHeads(cfg.roi_head, extractor, parts.roi_head, predictor, num_classes)
    return TwoStageDetector(transform, parts.trunk, proposal_generator, roi_heads, class_names)


def build_detector(cfg: ModelConfig, registries, num_classes: int | None = None, class_names=None) -> nn.Module:
    num_classes = num_classes or cfg.num_classes
    if not num_classes or num_classes < 1:
        raise ConfigError("model.num_classes: expected a positive integer (or a training dataset to take it from)")
    entry = registries.detectors.get(cfg.detector)
    return entry.builder(cfg=cfg, num_classes=num_classes, registries=registries, class_names=class_names)


def build_rpn(cfg: ModelConfig, in_channels: int, stride: int) -> RegionProposalNetwork:
    return RegionProposalNetwork(cfg.rpn, cfg.anchors, in_channels, stride)

