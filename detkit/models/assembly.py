"""The two-stage lineage's assembly: the backbone's parts, the parts the detector's slots hold (each built from
its own settings with a typed context, :class:`~detkit.registry.contexts.DetectorContext.build`), and their
composition into a :class:`TwoStageDetector`. The registered detectors (``plugins/detkit_core``) call
:func:`build_two_stage` or :func:`build_rcnn`; a lineage of another shape reuses :func:`backbone_parts` and
:func:`build_roi_extractor` and composes its own heads.

Parts declare what they consume and produce in their registration, and the assembly checks the
declarations instead of knowing the lineage: an RoI extractor consumes ``"features"`` (the trunk's
feature map: RoI pooling, RoIAlign, SPP) or ``"image"`` (windows cut from the image and passed through
the whole CNN: R-CNN's warp, which then owns the trunk, so it has an assembly of its own,
:func:`build_rcnn`), and produces a ``"grid"`` ``(R, C, S, S)`` for the backbone's RoI head or a flat
``"vector"`` (SPP), for which the RoI head's first fully connected layer is rebuilt.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.config import ConfigError, ModelConfig, check_kwargs, closest_hint
from detkit.models.detector import TwoStageDetector
from detkit.models.fpn import FeatureBody, WithNeck
from detkit.models.roi_heads import RoIHeads
from detkit.models.transform import DetectionTransform
from detkit.registry.binding import build_detector as _build_bound, plugin_errors
from detkit.registry.contexts import (BoxHeadContext, BoxPredictorContext, DetectorContext, NeckContext,
                                      ProposalGeneratorContext, RoIExtractorContext)

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
    with plugin_errors(registries, entry, f"model.backbone: backbone {entry.name!r}"):
        backbone = entry.builder(num_classes=num_classes, **cfg.backbone.args)
    if cfg.backbone.weights:
        declared = _declared_weights_layout(cfg.backbone.weights_layout, backbone, entry.name)
        # logs what it loaded, missed and skipped, and the file's weights layout
        backbone.load_pretrained(cfg.backbone.weights, declared_layout=declared, settings="model.backbone")
    return backbone


def _declared_weights_layout(declared: dict | None, backbone, name: str) -> dict | None:
    """``model.backbone.weights_layout`` checked against the layout the backbone declares: its keys, and values
    of the types the backbone's have."""
    if not declared:
        return None
    own = backbone.weights_layout()
    if not own:
        raise ConfigError(f"model.backbone.weights_layout: backbone {name!r} declares no weights layout (its "
                          f"weights mean the same in every configuration): remove the key")
    for key, value in declared.items():
        if key not in own:
            raise ConfigError(f"model.backbone.weights_layout.{key}: not part of the weights layout of "
                              f"backbone {name!r}{closest_hint(str(key), list(own), 'model.backbone.weights_layout')}")
        if type(value) is not type(own[key]):
            raise ConfigError(f"model.backbone.weights_layout.{key}={value!r}: expected a "
                              f"{type(own[key]).__name__}, as model.backbone.args.{key}")
    return dict(declared)


@dataclass
class Body:
    """What the heads are built on: ``trunk`` maps the image batch to one map (a Tensor) or, with a neck, to
    a list of maps finest first, all ``channels`` deep, of ``strides``; the RoI extractor pools from the
    first ``roi_levels`` of them."""

    trunk: nn.Module
    channels: int
    strides: list[int]
    roi_levels: int


def backbone_parts(ctx: DetectorContext):
    """The backbone, its detection parts and the body the heads are built on (the trunk, or the backbone's
    feature stages and the neck the ``neck`` slot holds), with batch norm frozen and the first ``freeze_at``
    stages fixed as the config says."""
    cfg = ctx.model
    backbone = build_backbone(cfg, ctx.registries)
    parts = backbone.detection_parts()
    if cfg.neck is None:
        body = Body(parts.trunk, parts.out_channels, [parts.stride], 1)
        _fix(cfg, [parts.trunk, parts.box_head], parts.stages)
        return backbone, parts, body
    body_module, neck = _neck(ctx, backbone)
    _fix(cfg, [body_module.stages, parts.box_head], list(body_module.stages))
    channels = sorted({info.channels for info in neck.out_info})
    if len(channels) != 1:
        raise ConfigError(f"model.neck.name={cfg.neck.name!r}: its maps have {channels} channels; the heads are "
                          f"shared across levels and need one width")
    body = Body(WithNeck(body_module, neck), channels[0], [info.stride for info in neck.out_info], neck.roi_levels)
    return backbone, parts, body


def _neck(ctx: DetectorContext, backbone) -> tuple[FeatureBody, nn.Module]:
    cfg = ctx.model
    try:
        stages = backbone.feature_stages()
    except NotImplementedError as exc:
        raise ConfigError(f"model.neck.name={cfg.neck.name!r}: backbone {cfg.backbone.name!r} cannot take a "
                          f"neck: {exc}") from None
    neck = ctx.build("neck", NeckContext(stages=stages, backbone=f"backbone {cfg.backbone.name!r}"))
    return FeatureBody(stages, neck.in_indices), neck


def _fix(cfg: ModelConfig, containers: list[nn.Module], stages: list[nn.Module]) -> None:
    """Frozen batch norm in ``containers`` (``model.backbone.frozen_bn``) and no gradients for the first
    ``model.backbone.freeze_at`` of ``stages``."""
    frozen_bn = cfg.backbone.frozen_bn if cfg.backbone.frozen_bn is not None else bool(cfg.backbone.weights)
    if frozen_bn:
        for module in containers:
            freeze_batchnorm(module)
    freeze_at = len(stages) if cfg.backbone.freeze_at < 0 else cfg.backbone.freeze_at
    if freeze_at > len(stages):
        raise ConfigError(f"model.backbone.freeze_at={cfg.backbone.freeze_at}: backbone {cfg.backbone.name!r} "
                          f"has only {len(stages)} {'feature' if cfg.neck else 'trunk'} stages")
    for stage in stages[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)


def build_roi_extractor(ctx: DetectorContext, backbone, parts, body: Body, consumes: str) -> nn.Module:
    """The RoI extractor the ``roi_extractor`` slot holds, which must consume what this assembly hands it
    (``consumes``: "features" or "image", as the extractor's registration declares)."""
    cfg = ctx.model
    declared = ctx.registries.roi_extractors.get(cfg.roi_extractor.name).info.get("consumes", "features")
    if declared != consumes:
        raise ConfigError(f"model.roi_extractor.name={cfg.roi_extractor.name!r} consumes {declared}, but "
                          f"model.detector={cfg.detector.name!r} hands its extractor {consumes}")
    defaults = backbone.defaults
    return ctx.build("roi_extractor", RoIExtractorContext(
        output_size=defaults.roi_output_size, strides=body.strides[: body.roi_levels], trunk=parts.trunk,
        input_size=defaults.input_size[-1]))


def compose(ctx: DetectorContext, backbone, parts, body: Body, extractor: nn.Module) -> TwoStageDetector:
    """The detector from its parts: ``body`` feeds the proposal source and ``extractor``; the box head the
    ``box_head`` slot holds (by default the backbone's RoI head) and the box predictor classify the regions."""
    cfg = ctx.model
    grid = ctx.registries.roi_extractors.get(cfg.roi_extractor.name).info.get("produces", "grid") == "grid"
    pooled_shape = (body.channels, *extractor.output_size) if grid else (extractor.out_features(body.channels),)
    box_head, head_features = ctx.build("box_head", BoxHeadContext(
        pooled_shape=tuple(pooled_shape), backbone_head=parts.box_head, head_in_channels=parts.out_channels,
        head_channels=parts.head_channels))
    defaults, t = backbone.defaults, cfg.transform
    transform = DetectionTransform(
        t.min_size, t.max_size, t.mean or list(defaults.mean), t.std or list(defaults.std),
        t.size_divisible or max(body.strides), in_channels=defaults.input_size[0],
    )
    proposal_generator = ctx.build("proposal_generator", ProposalGeneratorContext(
        in_channels=body.channels, strides=list(body.strides)))
    predictor = ctx.build("box_predictor", BoxPredictorContext(
        in_features=head_features, num_classes=ctx.num_classes, pooled_features=math.prod(pooled_shape),
        box_coder_weights=tuple(cfg.roi_heads.box_coder_weights)))
    roi_heads = RoIHeads(cfg.roi_heads, extractor, box_head, predictor, ctx.num_classes)
    detector = TwoStageDetector(transform, body.trunk, proposal_generator, roi_heads, ctx.class_names)
    detector.test_scales = list(t.test_scales or [])
    return detector


def build_two_stage(settings, ctx: DetectorContext) -> TwoStageDetector:
    """Any proposal source, RoI extractor on the trunk's (or the neck's) features, box head and box
    predictor (Fast and Faster R-CNN, SPP-net, with or without FPN)."""
    backbone, parts, body = backbone_parts(ctx)
    extractor = build_roi_extractor(ctx, backbone, parts, body, consumes="features")
    return compose(ctx, backbone, parts, body, extractor)


def build_rcnn(settings, ctx: DetectorContext) -> TwoStageDetector:
    """R-CNN (Girshick et al. 2014, Sec. 2.1): the extractor cuts each window from the image and passes it
    through the whole CNN, so it owns the trunk; the detector's own trunk is the identity (its "features"
    are the normalised images, of stride 1)."""
    if ctx.model.neck is not None:
        raise ConfigError(f"model.neck.name={ctx.model.neck.name!r}: R-CNN runs the whole CNN on each warped "
                          f"window; it takes no neck")
    backbone, parts, body = backbone_parts(ctx)
    extractor = build_roi_extractor(ctx, backbone, parts, body, consumes="image")
    windows = Body(nn.Identity(), body.channels, [1], 1)
    return compose(ctx, backbone, parts, windows, extractor)


def backbone_box_head(pooled_shape: tuple[int, ...], backbone_head: nn.Module, head_in_channels: int,
                      head_channels: int) -> tuple[nn.Module, int]:
    """The backbone's own RoI head on regions of ``pooled_shape``: as it is on a ``(C, S, S)`` grid of its
    trunk's width; on a flat vector (SPP) with its first fully connected layer (fc6) rebuilt for that length
    (so it starts untrained) when the length differs."""
    if len(pooled_shape) == 3:
        if pooled_shape[0] != head_in_channels:
            raise ConfigError(f"model.box_head.name='backbone': the backbone's RoI head takes {head_in_channels}-"
                              f"channel regions, the neck gives {pooled_shape[0]}; use a light box head "
                              f"(model.box_head: two_fc)")
        return backbone_head, head_channels
    (in_features,) = pooled_shape
    first = next((m for m in backbone_head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Linear):
        raise ConfigError(f"model.roi_extractor pools a flat vector, but the backbone's RoI head starts with "
                          f"{type(first).__name__ if first is not None else 'no layer'}, not a fully connected "
                          f"layer (use model.box_head: two_fc)")
    if first.in_features == in_features:
        return backbone_head, head_channels
    for module in backbone_head.modules():
        for name, child in module.named_children():
            if child is first:
                setattr(module, name, nn.Linear(in_features, first.out_features, bias=first.bias is not None))
                log.info("RoI head: %s rebuilt as %d -> %d for the pooled vector", name, in_features,
                         first.out_features)
                return backbone_head, head_channels
    raise ConfigError("model.box_head.name='backbone': could not rebuild the RoI head's first layer")


def build_detector(cfg: ModelConfig, registries, num_classes: int | None = None, class_names=None) -> nn.Module:
    """The detector ``model.detector`` names, built from its slots after binding the model to the registries."""
    num_classes = num_classes or cfg.num_classes
    if not num_classes or num_classes < 1:
        raise ConfigError("model.num_classes: expected a positive integer (or a training dataset to take it from)")
    return _build_bound(cfg, registries, num_classes, class_names)
