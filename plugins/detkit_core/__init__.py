"""detkit's built-in parts, registered exactly as a third-party plugin would be.

Proposal sources, RoI feature extractors, detection heads, detector assemblies,
dataset formats and training schedules (``schedules``). Backbones live in their
family plugins.
"""
from __future__ import annotations

from detkit.hookspecs import hookimpl


def _rpn(settings, in_channels: int, strides: list[int]):
    from detkit.models.rpn import RegionProposalNetwork

    return RegionProposalNetwork(settings, in_channels, strides)


def _selective_search(settings, in_channels: int | None, strides: list[int] | None):
    from detkit.models.precomputed import SelectiveSearchProposals

    return SelectiveSearchProposals(settings)


def _precomputed(settings, in_channels: int, strides: list[int]):
    from detkit.models.precomputed import PrecomputedProposals

    return PrecomputedProposals(settings.top_k)


def _fpn(settings, stages, backbone: str):
    from detkit.models.fpn import FeaturePyramid

    return FeaturePyramid(stages, settings, backbone)


def _roi_pool(settings, output_size: int, strides: list[int], **_):
    from detkit.ops import RoIPoolExtractor

    return RoIPoolExtractor(settings.output_size or output_size, strides)


def _roi_align(settings, output_size: int, strides: list[int], **_):
    from detkit.ops import RoIAlignExtractor

    return RoIAlignExtractor(settings.output_size or output_size, strides, settings.sampling_ratio, settings.aligned,
                             settings.cpu_sparse)


def _spp(settings, strides: list[int], **_):
    from detkit.ops.spp import SpatialPyramidPool

    return SpatialPyramidPool(settings.levels, strides)


def _warp(settings, output_size: int, trunk, input_size: int, **_):
    from detkit.ops.warp import WarpExtractor

    return WarpExtractor(trunk, settings.output_size or output_size, settings.warp_size or input_size,
                         settings.context_padding, settings.warp_batch)


def _backbone_head(settings, pooled_shape: tuple, backbone_head, head_in_channels: int, head_channels: int):
    from detkit.models.assembly import backbone_box_head

    return backbone_box_head(pooled_shape, backbone_head, head_in_channels, head_channels)


def _two_fc(settings, pooled_shape: tuple, **_):
    import math

    from detkit.models.box_heads import TwoFCHead

    head = TwoFCHead(math.prod(pooled_shape), settings.fc_dim)
    return head, head.out_features


def _conv_fc(settings, pooled_shape: tuple, **_):
    from detkit.config import ConfigError
    from detkit.models.box_heads import ConvFCHead

    if len(pooled_shape) != 3:
        raise ConfigError(f"model.box_head.name='conv_fc' convolves a pooled grid; the RoI extractor gives flat "
                          f"vectors of {pooled_shape[0]} (use two_fc)")
    head = ConvFCHead(pooled_shape[0], pooled_shape[1:], settings)
    return head, head.out_features


def _softmax_box(settings, in_features: int, num_classes: int, **_):
    from detkit.models.roi_heads import SoftmaxBoxHead

    return SoftmaxBoxHead(in_features, num_classes, settings.dropout)


def _svm(settings, in_features: int, num_classes: int, pooled_features: int, box_coder_weights: tuple, **_):
    from detkit.models.svm import SVMBoxHead

    return SVMBoxHead(in_features, num_classes, pooled_features, box_coder_weights=box_coder_weights)


def _detector(name: str, proposal_generators: tuple[str, ...] = (), roi_extractors: tuple[str, ...] = (),
              windows: bool = False):
    """A named member of the lineage: an assembly (R-CNN's, with ``windows``, or the generic two-stage one),
    checked for the parts that make it that detector (``two_stage`` takes any combination)."""

    def build(cfg, num_classes: int, registries, class_names=None):
        from detkit.config import ConfigError
        from detkit.models.assembly import build_rcnn, build_two_stage

        chosen = cfg.proposal_generator.name
        if proposal_generators and chosen not in proposal_generators:
            raise ConfigError(f"model.proposal_generator.name={chosen!r}: {name} uses "
                              f"{' or '.join(map(repr, proposal_generators))} (model.detector: two_stage takes any)")
        if roi_extractors and cfg.roi_extractor.name not in roi_extractors:
            raise ConfigError(f"model.roi_extractor.name={cfg.roi_extractor.name!r}: {name} uses "
                              f"{' or '.join(map(repr, roi_extractors))} (model.detector: two_stage takes any)")
        return (build_rcnn if windows else build_two_stage)(cfg, num_classes, registries, class_names)

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
def detkit_register_necks(register):
    from detkit.models.fpn import FPNSettings

    register("fpn", _fpn, settings=FPNSettings, paper="Lin et al. 2017 (Feature Pyramid Networks)")


@hookimpl
def detkit_register_proposal_generators(register):
    from detkit.models.precomputed import PrecomputedSettings, SelectiveSearchSettings
    from detkit.models.rpn import RPNSettings

    register("rpn", _rpn, settings=RPNSettings, paper="Faster R-CNN, Sec. 3.1")
    register("selective_search", _selective_search, settings=SelectiveSearchSettings, per_dataset=True,
             paper="Uijlings et al. 2013 (cached per dataset)")
    register("precomputed", _precomputed, settings=PrecomputedSettings,
             paper="boxes from a proposal cache (4-step training)")


@hookimpl
def detkit_register_roi_extractors(register):
    from detkit.ops.roi import RoIAlignSettings, RoIPoolSettings
    from detkit.ops.spp import SPPSettings
    from detkit.ops.warp import WarpSettings

    register("roi_pool", _roi_pool, settings=RoIPoolSettings, paper="Fast R-CNN, Sec. 2.1")
    register("roi_align", _roi_align, settings=RoIAlignSettings, paper="Mask R-CNN, Sec. 3")
    register("spp", _spp, settings=SPPSettings, produces="vector", paper="SPP-net, Sec. 2.3")
    register("warp", _warp, settings=WarpSettings, consumes="image", paper="R-CNN, Sec. 2.1 and Appendix A")


@hookimpl
def detkit_register_box_heads(register):
    from detkit.models.box_heads import ConvFCSettings, TwoFCSettings

    register("backbone", _backbone_head, paper="the backbone's own RoI head (VGG fc6/fc7, ResNet res5)")
    register("two_fc", _two_fc, settings=TwoFCSettings, paper="FPN, Sec. 4.2 (2 x 1024-d fc)")
    register("conv_fc", _conv_fc, settings=ConvFCSettings, paper="Detectron2's 4conv1fc")


@hookimpl
def detkit_register_heads(register):
    from detkit.models.roi_heads import SoftmaxBoxSettings
    from detkit.models.svm import SVMSettings

    register("softmax_box", _softmax_box, settings=SoftmaxBoxSettings, paper="Fast R-CNN, Sec. 2.2")
    # Not trained by SGD: fine-tuned with a softmax_box head first, then the SVMs and regressors are fitted.
    register("svm", _svm, settings=SVMSettings, schedule="svm_posthoc", finetune_head="softmax_box",
             paper="R-CNN, Sec. 2.3 (SVMs) and Appendix C (box regression)")


@hookimpl
def detkit_register_detectors(register):
    register("rcnn", _detector("rcnn", ("selective_search", "precomputed"), ("warp",), windows=True),
             paper="Girshick et al. 2014")
    register("spp_net", _detector("spp_net", ("selective_search", "precomputed"), ("spp",)), paper="He et al. 2014")
    register("fast_rcnn", _detector("fast_rcnn", ("selective_search", "precomputed"), ("roi_pool", "roi_align")),
             paper="Girshick 2015")
    register("faster_rcnn", _detector("faster_rcnn", ("rpn",)), paper="Ren et al. 2015")
    register("two_stage", _detector("two_stage"), paper="any proposal source, feature-map RoI extractor and head")


@hookimpl
def detkit_register_datasets(register):
    register("coco", _coco, format="COCO json (pycocotools)")
    register("voc", _voc, format="Pascal VOC devkit layout")
    register("concat", _concat, format="several datasets with one class list (VOC 07+12)")


@hookimpl
def detkit_register_classification_datasets(register):
    from detkit.classification import datasets

    register("image_folder", datasets.image_folder, format="root/<class>/<image> (torchvision ImageFolder layout)")
    register("image_list", datasets.image_list, format="CSV or JSON list of (image, label)")
    register("digits", datasets.digits, format="scikit-learn's bundled 8x8 handwritten digits (train/test split)")


@hookimpl
def detkit_register_schedules(register):
    register("end_to_end", _end_to_end, default=True,
             paper="one run of SGD; Faster R-CNN Sec. 3.2 (ii), approximate joint training")
    register("four_step", _four_step, single_process=True, paper="Faster R-CNN, Sec. 3.2, 4-step alternating training")
    register("svm_posthoc", _svm_posthoc, single_process=True,
             paper="R-CNN Sec. 2.3, SPP-net Sec. 4.1: fine-tuning, then SVMs and box regression")
