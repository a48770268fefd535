"""Building a detector from a model config: the backbone's parts, the registered parts the config
chooses (each with its own settings), and their composition into a :class:`TwoStageDetector`.

Parts declare what they consume and produce in their registration, and the assembly checks the
declarations instead of knowing the lineage: an RoI extractor consumes ``"features"`` (the trunk's
feature map: RoI pooling, RoIAlign, SPP) or ``"image"`` (windows cut from the image and passed through
the whole CNN: R-CNN's warp, which then owns the trunk, so it has an assembly of its own,
:func:`build_rcnn`), and produces a ``"grid"`` ``(R, C, S, S)`` for the backbone's RoI head or a flat
``"vector"`` (SPP), for which the RoI head's first fully connected layer is rebuilt.
"""
from __future__ import annotations

import logging

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.config import ConfigError, ModelConfig, bind_parts, check_kwargs
from detkit.models.detector import TwoStageDetector
from detkit.models.roi_heads import RoIHeads
from detkit.models.transform import DetectionTransform

log = logging.getLogger(__name__)


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


def backbone_parts(cfg: ModelConfig, registries):
    """The backbone and its detection parts, with batch norm frozen and the first ``freeze_at`` stages
    fixed as the config says."""
    backbone = build_backbone(cfg, registries)
    parts = backbone.detection_parts()
    frozen_bn = cfg.backbone.frozen_bn if cfg.backbone.frozen_bn is not None else bool(cfg.backbone.weights)
    if frozen_bn:
        freeze_batchnorm(parts.trunk)
        freeze_batchnorm(parts.roi_head)
    freeze_at = len(parts.stages) if cfg.backbone.freeze_at < 0 else cfg.backbone.freeze_at
    if freeze_at > len(parts.stages):
        raise ConfigError(f"model.backbone.freeze_at={cfg.backbone.freeze_at}: backbone {cfg.backbone.name!r} "
                          f"has only {len(parts.stages)} trunk stages")
    for stage in parts.stages[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)
    return backbone, parts


def build_roi_extractor(cfg: ModelConfig, registries, backbone, parts, consumes: str) -> nn.Module:
    """The configured RoI extractor, which must consume what this assembly hands it (``consumes``)."""
    entry = registries.roi_extractors.get(cfg.roi_extractor.name)
    declared = entry.info.get("consumes", "features")
    if declared != consumes:
        raise ConfigError(
            f"model.roi_extractor.name={cfg.roi_extractor.name!r} consumes {declared}, but model.detector="
            f"{cfg.detector!r} hands its extractor {consumes}"
            + (" (R-CNN's warp runs the whole CNN per window: model.detector: rcnn)" if declared == "image" else ""))
    defaults = backbone.defaults
    return entry.builder(cfg.roi_extractor.settings, output_size=defaults.roi_output_size, stride=parts.stride,
                         trunk=parts.trunk, input_size=defaults.input_size[-1])


def compose(cfg: ModelConfig, num_classes: int, registries, class_names, backbone, parts, extractor: nn.Module,
            trunk: nn.Module, stride: int) -> TwoStageDetector:
    """The detector from its parts: ``trunk`` (of ``stride``) feeds the proposal source and ``extractor``;
    the backbone's RoI head and the configured box predictor classify the extracted regions."""
    box_head = parts.roi_head
    if registries.roi_extractors.get(cfg.roi_extractor.name).info.get("produces", "grid") == "vector":
        box_head = _fit_first_linear(box_head, extractor.out_features(parts.out_channels), cfg)
    defaults, t = backbone.defaults, cfg.transform
    transform = DetectionTransform(
        t.min_size, t.max_size, t.mean or list(defaults.mean), t.std or list(defaults.std),
        t.size_divisible or stride, in_channels=defaults.input_size[0],
    )
    source = registries.proposal_generators.get(cfg.proposal_generator.name)
    proposal_generator = source.builder(cfg.proposal_generator.settings, in_channels=parts.out_channels, stride=stride)
    predictor = registries.heads.get(cfg.box_predictor.name).builder(
        cfg.box_predictor.settings, in_features=parts.head_channels, num_classes=num_classes,
        pooled_features=extractor.out_features(parts.out_channels),
        box_coder_weights=tuple(cfg.roi_heads.box_coder_weights))
    roi_heads = RoIHeads(cfg.roi_heads, extractor, box_head, predictor, num_classes)
    detector = TwoStageDetector(transform, trunk, proposal_generator, roi_heads, class_names)
    detector.test_scales = list(t.test_scales or [])
    return detector


def build_two_stage(cfg: ModelConfig, num_classes: int, registries, class_names=None) -> TwoStageDetector:
    """Any proposal source, RoI extractor on the trunk's features, and box predictor (Fast and Faster
    R-CNN, SPP-net)."""
    backbone, parts = backbone_parts(cfg, registries)
    extractor = build_roi_extractor(cfg, registries, backbone, parts, consumes="features")
    return compose(cfg, num_classes, registries, class_names, backbone, parts, extractor, parts.trunk, parts.stride)


def build_rcnn(cfg: ModelConfig, num_classes: int, registries, class_names=None) -> TwoStageDetector:
    """R-CNN (Girshick et al. 2014, Sec. 2.1): the extractor cuts each window from the image and passes it
    through the whole CNN, so it owns the trunk; the detector's own trunk is the identity (its "features"
    are the normalised images, of stride 1)."""
    backbone, parts = backbone_parts(cfg, registries)
    extractor = build_roi_extractor(cfg, registries, backbone, parts, consumes="image")
    return compose(cfg, num_classes, registries, class_names, backbone, parts, extractor, nn.Identity(), 1)


def _fit_first_linear(box_head: nn.Module, in_features: int, cfg: ModelConfig) -> nn.Module:
    """SPP changes the length of the pooled vector: the RoI head's first fully connected layer (fc6) is
    rebuilt for it (and so starts untrained) when its input size differs."""
    first = next((m for m in box_head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Linear):
        raise ConfigError(f"model.roi_extractor.name={cfg.roi_extractor.name!r} pools a flat vector, but the RoI "
                          f"head of backbone {cfg.backbone.name!r} starts with "
                          f"{type(first).__name__ if first is not None else 'no layer'}, not a fully connected layer")
    if first.in_features == in_features:
        return box_head
    for module in box_head.modules():
        for name, child in module.named_children():
            if child is first:
                setattr(module, name, nn.Linear(in_features, first.out_features, bias=first.bias is not None))
                log.info("RoI head: %s rebuilt as %d -> %d for the pooled vector", name, in_features,
                         first.out_features)
                return box_head
    raise ConfigError(f"model.backbone.name={cfg.backbone.name!r}: could not rebuild the RoI head's first layer")


def build_detector(cfg: ModelConfig, registries, num_classes: int | None = None, class_names=None) -> nn.Module:
    """The detector ``model.detector`` names, its part sections checked against their parts' settings."""
    num_classes = num_classes or cfg.num_classes
    if not num_classes or num_classes < 1:
        raise ConfigError("model.num_classes: expected a positive integer (or a training dataset to take it from)")
    bind_parts(cfg, registries)
    entry = registries.detectors.get(cfg.detector)
    return entry.builder(cfg=cfg, num_classes=num_classes, registries=registries, class_names=class_names)
