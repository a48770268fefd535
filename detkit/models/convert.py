"""Loading torchvision's detection weights: a ``fasterrcnn_resnet50_fpn`` state dict (a local file) as a
detkit checkpoint of the same network, so people with torchvision weights can run, evaluate and fine-tune
them with detkit at once.

The detkit model is R50-FPN Faster R-CNN with torchvision's conventions where the two toolkits differ
(:func:`torchvision_config`): anchors centred on cell corners and rounded to whole pixels, images padded to
multiples of 32, NMS 0.5 on detections, the RPN's ``min_size`` 1e-3 px. Parameters are renamed
(``backbone.body.layer1`` -> ``trunk.body.stages.1``, ``backbone.fpn.inner_blocks`` -> ``trunk.neck.lateral``,
``roi_heads.box_head.fc6`` -> ``roi_heads.box_head.1``, ...); every detkit parameter must be found and
every torchvision one used, or the conversion fails naming the keys. Labels stay torchvision's: a 91-way
COCO model keeps COCO's category ids (1-90, with torchvision's "N/A" for the unused ones).
"""
from __future__ import annotations

import copy
import re

from detkit.config import Config, ConfigError, from_dict

#: torchvision key pattern -> detkit key (``\\1``: the captured rest)
RENAMES = [
    (r"backbone\.body\.conv1\.(.*)", r"trunk.body.stages.0.0.\1"),
    (r"backbone\.body\.bn1\.(.*)", r"trunk.body.stages.0.1.\1"),
    (r"backbone\.body\.layer(\d)\.(.*)", r"trunk.body.stages.\1.\2"),
    (r"backbone\.fpn\.inner_blocks\.(\d)\.(?:0\.)?(weight|bias)", r"trunk.neck.lateral.\1.\2"),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.(?:0\.)?(weight|bias)", r"trunk.neck.output.\1.\2"),
    (r"rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)", r"proposal_generator.head.conv.\1"),
    (r"rpn\.head\.(cls_logits|bbox_pred)\.(.*)", r"proposal_generator.head.\1.\2"),
    (r"roi_heads\.box_head\.fc6\.(.*)", r"roi_heads.box_head.1.\1"),
    (r"roi_heads\.box_head\.fc7\.(.*)", r"roi_heads.box_head.3.\1"),
    (r"roi_heads\.box_predictor\.(.*)", r"roi_heads.predictor.\1"),
]


def torchvision_config(image_min_size: int = 800, image_max_size: int = 1333) -> Config:
    """The detkit config of torchvision's ``fasterrcnn_resnet50_fpn`` (its default settings)."""
    return from_dict({"model": {
        "detector": "faster_rcnn",
        "backbone": {"name": "resnet50", "frozen_bn": True, "freeze_at": 2, "args": {"stride_in_1x1": False}},
        "neck": {"name": "fpn", "in_strides": [4, 8, 16, 32], "out_channels": 256, "extra_levels": 1},
        "proposal_generator": {"name": "rpn", "anchors": {"sizes": [32, 64, 128, 256, 512], "offset": 0.0,
                                                          "round": True},
                               "straddle_thresh": -1.0, "pre_nms_top_n_train": 2000, "post_nms_top_n_train": 2000,
                               "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 1000, "min_size": 1e-3},
        "roi_extractor": {"name": "roi_align", "output_size": 7, "sampling_ratio": 2},
        "box_head": {"name": "two_fc", "fc_dim": 1024},
        "roi_heads": {"batch_size_per_image": 512, "positive_fraction": 0.25, "bg_iou_thresh_lo": 0.0,
                      "nms_thresh": 0.5, "smooth_l1_beta": 1.0 / 9},
        "transform": {"min_size": image_min_size, "max_size": image_max_size, "size_divisible": 32},
    }}, source="torchvision fasterrcnn_resnet50_fpn")


def rename_torchvision(state: dict) -> dict:
    """torchvision's keys as detkit's; raises ConfigError naming keys that match no rule."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, target in RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"not a torchvision fasterrcnn_resnet50_fpn state dict: {len(unknown)} keys match "
                          f"nothing, e.g. {unknown[:3]}")
    return out


def class_names_for(num_classes: int) -> tuple[list[str], list[int]]:
    """Class names and category ids of a torchvision model with ``num_classes`` outputs (background
    included): COCO's for 91, ``class_1``... otherwise; label k is category id k."""
    if num_classes == 91:
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

        names = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    else:
        names = [f"class_{k}" for k in range(1, num_classes)]
    return names, list(range(1, num_classes))


def load_torchvision_state(path: str) -> dict:
    from detkit.engine.state_dict import read_state_dict

    try:
        state = read_state_dict(path, "torchvision state dict")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise ConfigError(f"{path}: expected a fasterrcnn_resnet50_fpn state dict (roi_heads.box_predictor.* "
                          f"missing)")
    return state


def from_torchvision(path: str, registries, cfg: Config | None = None):
    """The detkit model holding the weights of torchvision's ``fasterrcnn_resnet50_fpn`` state dict at
    ``path``; returns ``(model, cfg, class_names, cat_ids)``."""
    from detkit.models.assembly import build_detector

    state = rename_torchvision(load_torchvision_state(path))
    num_classes = int(state["roi_heads.predictor.cls_score.weight"].shape[0])
    names, cat_ids = class_names_for(num_classes)
    cfg = copy.deepcopy(cfg) if cfg is not None else torchvision_config()
    cfg.model.num_classes, cfg.model.class_names = len(names), names
    model = build_detector(cfg.model, registries, len(names), names)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"{path}: does not fit detkit's R50-FPN: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, shapes differ for {wrong[:3]}")
    model.load_state_dict(state)
    return model.eval(), cfg, names, cat_ids
