"""detkit's built-in parts, registered exactly as a third-party plugin would be.

Proposal sources, RoI feature extractors, detection heads, detector assemblies,
dataset formats and training schedules (``schedules``). Backbones live in their
family plugins.
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


def _selective_search(cfg, in_channels: int, stride: int):
    from detkit.models.precomputed import SelectiveSearchProposals

    return SelectiveSearchProposals(cfg.selective_search)


def _precomputed(cfg, in_channels: int, stride: int):
    from detkit.models.precomputed import PrecomputedProposals

    return PrecomputedProposals(cfg.selective_search.top_k)


def _spp(output_size: int, stride: int, cfg=None):
    from detkit.ops.spp import SpatialPyramidPool

    return SpatialPyramidPool(cfg.levels if cfg else (6, 3, 2, 1), stride)


def _warp(output_size: int, stride: int, cfg=None, trunk=None, input_size: int = 224):
    from detkit.ops.warp import WarpExtractor

    if trunk is None:
        raise ValueError("warp: the extractor needs the backbone's trunk")
    return WarpExtractor(trunk, output_size, (cfg.warp_size if cfg and cfg.warp_size else input_size),
                         cfg.context_padding if cfg else 16, cfg.warp_batch if cfg else 128)


def _svm(in_features: int, num_classes: int, cfg=None, pooled_features: int | None = None):
    from detkit.models.svm import SVMBoxHead

    weights = tuple(cfg.box_coder_weights) if cfg else (10.0, 10.0, 5.0, 5.0)
    return SVMBoxHead(in_features, num_classes, pooled_features, box_coder_weights=weights)


def _detector(name: str, proposal_generators: tuple[str, ...] = (), roi_extractors: tuple[str, ...] = ()):
    """A named member of the lineage: the generic two-stage assembly, checked for the parts that make it
    that detector (``two_stage`` takes any combination)."""

    def build(cfg, num_classes: int, registries, class_names=None):
        from detkit.config import ConfigError
        from detkit.models.detector import build_two_stage

        if proposal_generators and cfg.proposal_generator not in proposal_generators:
            raise ConfigError(f"model.proposal_generator={cfg.proposal_generator!r}: {name} uses "
                              f"{' or '.join(map(repr, proposal_generators))} (model.detector: two_stage takes any)")
        if roi_extractors and cfg.roi_extractor.name not in roi_extractors:
            raise ConfigError(f"model.roi_extractor.name={cfg.roi_extractor.name!r}: {name} uses "
                              f"{' or '.join(map(repr, roi_extractors))} (model.detector: two_stage takes any)")
        return build_two_stage(cfg, num_classes, registries, class_names)

    return build


def _coco(images: str, annotations: str, transform=None, skip_empty: bool = False):
    from detkit.data.coco import COCODataset

    return COCODataset(images=images, annotations=annotations, transform=transform, skip_empty=skip_empty)


def _voc(root: str, split: str = "trainval", classes: list | None = None, use_difficult: bool = True,
         transform=None, skip_empty: bool = False):
    from detkit.data.voc import VOCDataset

    return VOCDataset(root=root, split=split, classes=classes, use_difficult=use_difficult, transform=transform,
                      skip_empty=skip_empty)


def _concat(datasets: list, build_dataset, transform=None, skip_empty: bool = False):
    """``build_dataset(spec, key)`` (from detkit) builds each part from the caller's registries."""
    from detkit.config import ConfigError
    from detkit.data.concat import ConcatDataset

    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError("concat: 'datasets' must be a list of dataset mappings ({name: voc, root: ...})")
    parts = [build_dataset(d, f"datasets[{k}]") for k, d in enumerate(datasets)]
    return ConcatDataset(parts, transform=transform, skip_empty=skip_empty)


def _end_to_end(cfg, registries, resume=None, progress: bool = True) -> dict:
    from detkit.training import train_stage

    return train_stage(cfg, registries, resume, progress)


def _four_step(cfg, registries, resume=None, progress: bool = True) -> dict:
    from .schedules import train_four_step

    return train_four_step(cfg, registries, resume, progress)


def _svm_posthoc(cfg, registries, resume=None, progress: bool = True) -> dict:
    from .schedules import train_with_svms

    return train_with_svms(cfg, registries, resume, progress)


@hookimpl
def detkit_register_proposal_generators(register):
    register("rpn", _rpn, paper="Faster R-CNN, Sec. 3.1")
    register("selective_search", _selective_search, paper="Uijlings et al. 2013 (cached per dataset)")
    register("precomputed", _precomputed, paper="boxes from a proposal cache (4-step training)")


@hookimpl
def detkit_register_roi_extractors(register):
    register("roi_pool", _roi_pool, paper="Fast R-CNN, Sec. 2.1")
    register("roi_align", _roi_align, paper="Mask R-CNN, Sec. 3")
    register("spp", _spp, paper="SPP-net, Sec. 2.3")
    register("warp", _warp, input="image", paper="R-CNN, Sec. 2.1 and Appendix A")


@hookimpl
def detkit_register_heads(register):
    register("softmax_box", _softmax_box, paper="Fast R-CNN, Sec. 2.2")
    # Not trained by SGD: fine-tuned with a softmax_box head first, then the SVMs and regressors are fitted.
    register("svm", _svm, schedule="svm_posthoc", finetune_head="softmax_box",
             paper="R-CNN, Sec. 2.3 (SVMs) and Appendix C (box regression)")


@hookimpl
def detkit_register_detectors(register):
    register("rcnn", _detector("rcnn", ("selective_search", "precomputed"), ("warp",)), paper="Girshick et al. 2014")
    register("spp_net", _detector("spp_net", ("selective_search", "precomputed"), ("spp",)), paper="He et al. 2014")
    register("fast_rcnn", _detector("fast_rcnn", ("selective_search", "precomputed"), ("roi_pool", "roi_align")),
             paper="Girshick 2015")
    register("faster_rcnn", _detector("faster_rcnn", ("rpn",)), paper="Ren et al. 2015")
    register("two_stage", _detector("two_stage"), paper="any proposal source, RoI extractor and head")


@hookimpl
def detkit_register_datasets(register):
    register("coco", _coco, format="COCO json (pycocotools)")
    register("voc", _voc, format="Pascal VOC devkit layout")
    register("concat", _concat, format="several datasets with one class list (VOC 07+12)")


@hookimpl
def detkit_register_schedules(register):
    register("end_to_end", _end_to_end, default=True,
             paper="one run of SGD; Faster R-CNN Sec. 3.2 (ii), approximate joint training")
    register("four_step", _four_step, single_process=True, paper="Faster R-CNN, Sec. 3.2, 4-step alternating training")
    register("svm_posthoc", _svm_posthoc, single_process=True,
             paper="R-CNN Sec. 2.3, SPP-net Sec. 4.1: fine-tuning, then SVMs and box regression")
