"""Cascade R-CNN (Cai and Vasconcelos, "Cascade R-CNN: Delving into High Quality Object Detection", CVPR 2018)
as a detkit plugin: the ``cascade_rcnn`` detector and the class-agnostic ``softmax_box_agnostic`` box
predictor.

It is built only on detkit's public interfaces: the registration hooks, :class:`~detkit.registry.kinds.Slot`,
the typed build contexts and the two-stage assembly's pieces (``backbone_parts``, ``build_roi_extractor``,
``compose``). Its slots are Faster R-CNN's, its ``model.roi_heads`` section takes the stages' lists.
"""
from __future__ import annotations

from detkit.hookspecs import hookimpl
from detkit.registry.kinds import Slot

PAPER = "Cai and Vasconcelos 2018 (Cascade R-CNN)"


def _cascade(settings, context):
    from .assembly import build_cascade

    return build_cascade(settings, context)


def _softmax_box_agnostic(settings, context):
    from .heads import SoftmaxBoxAgnostic

    return SoftmaxBoxAgnostic(context.in_features, context.num_classes, settings.dropout)


def _slots() -> list[Slot]:
    from .heads import CascadeSettings

    return [
        Slot("neck", "neck", doc="feature maps of several strides (fpn); none: the trunk's one map"),
        Slot("proposal_generator", "proposal_generator", "rpn"),
        Slot("roi_extractor", "roi_extractor", "roi_align", doc="pools every stage's boxes from the same maps"),
        Slot("roi_heads", settings=CascadeSettings, doc="the stages' IoU thresholds, loss weights and box coder "
             "weights, and the sampling, loss and post-processing they share"),
        Slot("box_head", "box_head", "backbone", doc="one per stage, each built from this section (backbone: "
             "copies of the backbone's own RoI head)"),
        Slot("box_predictor", "box_predictor", "softmax_box_agnostic", ("softmax_box_agnostic", "softmax_box"),
             doc="one per stage; class-agnostic boxes as in the paper, or class-specific (softmax_box)"),
    ]


@hookimpl
def detkit_register_detectors(register):
    register("cascade_rcnn", _cascade, slots=_slots(), paper=PAPER)


@hookimpl
def detkit_register_box_predictors(register):
    from detkit.models.roi_heads import SoftmaxBoxSettings

    register("softmax_box_agnostic", _softmax_box_agnostic, settings=SoftmaxBoxSettings,
             paper=f"softmax scores and one box for every class ({PAPER}, Sec. 4)")
