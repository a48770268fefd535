"""detkit's built-in parts, registered exactly as a third-party plugin would be.

Proposal sources, RoI feature extractors, detection heads, detector assemblies
and dataset formats. Backbones live in their family plugins.
"""
from __future__ import annotations

from detkit.hookspecs import hookimpl


def _rpn(cfg, in_channels: int, stride: int):
    from detkit.models.detector import build_rpn

    return build_rpn(cfg, in_channels, stride)


def _roi_pool(output_size: int, stride: int, cfg=None):
    from detkit.ops import RoIPoolExtractor

    return RoIPoolExtractor(output_size, stride)


def _roi_align(output_size: int, stride: int, cfg=None):
    from detkit.ops import RoIAlignExtractor

    return RoIAlignExtractor(output_size, stride, cfg.sampling_ratio if cfg else 0, cfg.aligned if cfg else False)


def _softmax_box(in_features: int, num_classes: int, cfg=None):
    from detkit.models.roi_heads import SoftmaxBoxHead

    return SoftmaxBoxHead(in_features, num_classes, cfg.dropout if cfg else 0.0)


def _faster_rcnn(cfg, num_classes: int, registries, class_names=None):
    from detkit.models.detector import build_two_stage

    if cfg.rpn.name != "rpn":
        # Faster R-CNN *is* the RPN variant; other sources make other detectors.
        from detkit.config import ConfigError

        raise ConfigError(f"model.rpn.name={cfg.rpn.name!r}: faster_rcnn needs the 'rpn' proposal generator")
    return build_two_stage(cfg, num_classes, registries, class_names)


def _coco(images: str, annotations: str, transform=None, skip_empty: bool = False):
    from detkit.data.coco import COCODataset

    return COCODataset(images=images, annotations=annotations, transform=transform, skip_empty=skip_empty)


def _voc(root: str, split: str = "trainval", classes: list | None = None, use_difficult: bool = True,
         transform=None, skip_empty: bool = False):
    from detkit.data.voc import VOCDataset

    return VOCDataset(root=root, split=split, classes=classes, use_difficult=use_difficult, transform=transform,
                      skip_empty=skip_empty)


def _concat(datasets: list, transform=None, skip_empty: bool = False):
    from detkit.config import ConfigError
    from detkit.data.concat import ConcatDataset
    from detkit.engine import build_dataset
    from detkit.plugins import get_registries

    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError("concat: 'datasets' must be a list of dataset mappings ({name: voc, root: ...})")
    registries = get_registries()
    parts = [build_dataset(d, registries, f"datasets[{k}]") for k, d in enumerate(datasets)]
    return ConcatDataset(parts, transform=transform, skip_empty=skip_empty)


@hookimpl
def detkit_register_proposal_generators(register):
    register("rpn", _rpn, paper="Faster R-CNN, Sec. 3.1")


@hookimpl
def detkit_register_roi_extractors(register):
    register("roi_pool", _roi_pool, paper="Fast R-CNN, Sec. 2.1")
    register("roi_align", _roi_align, paper="Mask R-CNN, Sec. 3")


@hookimpl
def detkit_register_heads(register):
    register("softmax_box", _softmax_box, paper="Fast R-CNN, Sec. 2.2")


@hookimpl
def detkit_register_detectors(register):
    register("faster_rcnn", _faster_rcnn, paper="Ren et al. 2015 (approximate joint training)")


@hookimpl
def detkit_register_datasets(register):
    register("coco", _coco, format="COCO json (pycocotools)")
    register("voc", _voc, format="Pascal VOC devkit layout")
    register("concat", _concat, format="several datasets with one class list (VOC 07+12)")
