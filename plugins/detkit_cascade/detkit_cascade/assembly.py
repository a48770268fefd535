"""The cascade's assembly: Faster R-CNN's (detkit.models.assembly), with a box head and a box predictor per
stage and the cascade's RoI heads in place of the single head.

The first stage's parts are built by detkit's own two-stage composition, which is handed a context whose
``build`` remembers the context each slot was built with; the later stages' box heads and predictors are
built from the same slots with those contexts (the predictor's with the stage's box coder weights). A slot
that hands back a module it already gave (the backbone's own RoI head, ``box_head: backbone``) is copied,
so every stage starts from the same (pretrained) weights and trains its own.
"""
from __future__ import annotations

import copy
import dataclasses

from detkit.config import ConfigError
from detkit.models.assembly import backbone_parts, build_roi_extractor, compose
from detkit.models.detector import TwoStageDetector
from detkit.registry.contexts import DetectorContext

from .heads import CascadeRoIHeads, check_settings, stage_settings


class CascadeRCNN(TwoStageDetector):
    """Cascade R-CNN: the two-stage detector's composition (transform, trunk, proposal source) with
    :class:`~detkit_cascade.heads.CascadeRoIHeads`. ``svd_layers`` is every stage's box head, in stage
    order (``--svd`` takes one rank per fully connected layer, stage 1's first)."""


def build_cascade(settings, ctx: DetectorContext) -> CascadeRCNN:
    cfg = ctx.model
    stages = check_settings(cfg.roi_heads)
    scales = cfg.transform.test_scales or []
    if len(scales) > 1:
        raise ConfigError(f"model.transform.test_scales={scales}: multi-scale testing pools each region once, from "
                          f"one level of an image pyramid; the cascade pools its refined boxes again at every "
                          f"stage: give one test scale")
    built: dict[str, object] = {}

    def build(key, context):
        built.setdefault(key, context)
        return ctx.build(key, context)

    first = DetectorContext(model=dataclasses.replace(cfg, slots={**cfg.slots, "roi_heads": stage_settings(
        cfg.roi_heads, 0)}), num_classes=ctx.num_classes, class_names=ctx.class_names, registries=ctx.registries,
        build=build)
    backbone, parts, body = backbone_parts(first)
    extractor = build_roi_extractor(first, backbone, parts, body, consumes="features")
    single = compose(first, backbone, parts, body, extractor)
    heads, predictors = [single.roi_heads.box_head], [single.roi_heads.predictor]
    for k in range(1, stages):
        head, features = ctx.build("box_head", built["box_head"])
        if any(head is h for h in heads):
            head = copy.deepcopy(head)
        heads.append(head)
        predictors.append(ctx.build("box_predictor", dataclasses.replace(
            built["box_predictor"], in_features=features,
            box_coder_weights=tuple(cfg.roi_heads.stage_box_coder_weights[k]))))
    roi_heads = CascadeRoIHeads(cfg.roi_heads, extractor, heads, predictors, ctx.num_classes)
    detector = CascadeRCNN(single.transform, single.trunk, single.proposal_generator, roi_heads, single.class_names)
    detector.test_scales = list(single.test_scales)
    return detector
