"""detkit's built-in parts, registered exactly as a third-party plugin would be.

Proposal sources, RoI feature extractors, detection heads, detector assemblies,
dataset formats and training schedules (``schedules``). Backbones live in their
family plugins.
"""
from __future__ import annotations

from detkit.hookspecs import hookimpl
from detkit.registry.kinds import Slot


def _rpn(settings, context):
    from detkit.models.rpn import RegionProposalNetwork

    return RegionProposalNetwork(settings, context.in_channels, context.strides)


def _selective_search(settings, context):
    from detkit.proposals.precomputed import SelectiveSearchProposals

    return SelectiveSearchProposals(settings)


def _precomputed(settings, context):
    from detkit.proposals.precomputed import PrecomputedProposals

    return PrecomputedProposals(settings.top_k)


def _fpn(settings, context):
    from detkit.models.fpn import FeaturePyramid

    return FeaturePyramid(context.stages, settings, context.backbone)


def _roi_pool(settings, context):
    from detkit.ops import RoIPoolExtractor

    return RoIPoolExtractor(settings.output_size or context.output_size, context.strides)


def _roi_align(settings, context):
    from detkit.ops import RoIAlignExtractor

    return RoIAlignExtractor(settings.output_size or context.output_size, context.strides, settings.sampling_ratio,
                             settings.aligned, settings.cpu_sparse)


def _spp(settings, context):
    from detkit.ops.spp import SpatialPyramidPool

    return SpatialPyramidPool(settings.levels, context.strides)


def _warp(settings, context):
    from detkit.ops.warp import WarpExtractor

    return WarpExtractor(context.trunk, settings.output_size or context.output_size,
                         settings.warp_size or context.input_size, settings.context_padding, settings.warp_batch)


def _backbone_head(settings, context):
    from detkit.models.assembly import backbone_box_head

    return backbone_box_head(context.pooled_shape, context.backbone_head, context.head_in_channels,
                             context.head_channels)


def _two_fc(settings, context):
    import math

    from detkit.models.box_heads import TwoFCHead

    head = TwoFCHead(math.prod(context.pooled_shape), settings.fc_dim)
    return head, head.out_features


def _conv_fc(settings, context):
    from detkit.config import ConfigError
    from detkit.models.box_heads import ConvFCHead

    shape = context.pooled_shape
    if len(shape) != 3:
        raise ConfigError(f"model.box_head.name='conv_fc' convolves a pooled grid; the RoI extractor gives flat "
                          f"vectors of {shape[0]} (use two_fc)")
    head = ConvFCHead(shape[0], shape[1:], settings)
    return head, head.out_features


def _softmax_box(settings, context):
    from detkit.models.roi_heads import SoftmaxBoxHead

    return SoftmaxBoxHead(context.in_features, context.num_classes, settings.dropout)


def _svm(settings, context):
    from detkit.models.svm import SVMBoxHead

    return SVMBoxHead(context.in_features, context.num_classes, context.pooled_features,
                      box_coder_weights=context.box_coder_weights)


def _two_stage(settings, context):
    from detkit.models.assembly import build_two_stage

    return build_two_stage(settings, context)


def _rcnn(settings, context):
    from detkit.models.assembly import build_rcnn

    return build_rcnn(settings, context)


def _slots(proposals: tuple[str, ...] = (), extractors: tuple[str, ...] = ()) -> list[Slot]:
    """The two-stage shape: a member of the lineage is that shape with the parts that make it that detector
    (``choices``; the first is the default); ``two_stage`` takes any."""
    from detkit.models.roi_heads import RoIHeadsSettings

    return [
        Slot("neck", "neck", doc="feature maps of several strides (fpn); none: the trunk's one map"),
        Slot("proposal_generator", "proposal_generator", (proposals or ("rpn",))[0], proposals),
        Slot("roi_extractor", "roi_extractor", (extractors or ("roi_pool",))[0], extractors),
        Slot("roi_heads", settings=RoIHeadsSettings, doc="the second stage's sampling, box coder, loss, test-time "
             "post-processing"),
        Slot("box_head", "box_head", "backbone", doc="backbone: the backbone's own RoI head (fc6/fc7, res5)"),
        Slot("box_predictor", "box_predictor", "softmax_box"),
    ]


def _coco(images: str, annotations: str, transform=None, skip_empty: bool = False,
          allow_outside_images: bool = False):
    from detkit.data.coco import COCODataset

    return COCODataset(images=images, annotations=annotations, transform=transform, skip_empty=skip_empty,
                       allow_outside_images=allow_outside_images)


def _voc(root: str, split: str = "trainval", classes: list | None = None, use_difficult: bool = True,
         transform=None, skip_empty: bool = False):
    from detkit.data.voc import VOCDataset

    return VOCDataset(root=root, split=split, classes=classes, use_difficult=use_difficult, transform=transform,
                      skip_empty=skip_empty)


def _coco_path(path: str, options: dict) -> dict | None:
    """A ``.json`` file is COCO annotations; the images are ``options["images"]`` or ``images/`` beside it."""
    import os

    if not path.endswith(".json"):
        return None
    images = options.get("images") or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    return {"name": "coco", "images": images, "annotations": path}


def _voc_path(path: str, options: dict) -> dict | None:
    """A folder with ``Annotations/`` is a VOC devkit year; the split and classes come from ``options``."""
    import os

    if not os.path.isdir(os.path.join(path, "Annotations")):
        return None
    spec = {"name": "voc", "root": path, "split": options.get("split") or "trainval"}
    if options.get("classes"):
        spec["classes"] = list(options["classes"])
    return spec


def _yolo(data: str, split: str = "train", transform=None, skip_empty: bool = False):
    from detkit.data.yolo import YOLODataset

    return YOLODataset(data=data, split=split, transform=transform, skip_empty=skip_empty)


def _yolo_path(path: str, options: dict) -> dict | None:
    """A ``.yaml``/``.yml`` file is a YOLO data.yaml; the split comes from ``options`` (default: train)."""
    if not path.endswith((".yaml", ".yml")):
        return None
    return {"name": "yolo", "data": path, "split": options.get("split") or "train"}


def _concat(datasets: list, build_dataset, transform=None, skip_empty: bool = False):
    """``build_dataset(spec, key)`` (from detkit) builds each part from the caller's registries."""
    from detkit.config import ConfigError
    from detkit.data.concat import ConcatDataset

    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError("concat: 'datasets' must be a list of dataset mappings ({name: voc, root: ...})")
    parts = [build_dataset(d, f"datasets[{k}]") for k, d in enumerate(datasets)]
    return ConcatDataset(parts, transform=transform, skip_empty=skip_empty)


def _end_to_end(settings, context) -> dict:
    from detkit.training import train_stage

    return train_stage(context.config, context.registries, context.resume, context.progress)


def _four_step(settings, context) -> dict:
    from .schedules import train_four_step

    return train_four_step(settings, context)


def _svm_posthoc(settings, context) -> dict:
    from .schedules import train_with_svms

    return train_with_svms(context.config, context.registries, context.resume, context.progress)


@hookimpl
def detkit_register_necks(register):
    from detkit.models.fpn import FPNSettings

    register("fpn", _fpn, settings=FPNSettings, paper="Lin et al. 2017 (Feature Pyramid Networks)")


@hookimpl
def detkit_register_proposal_generators(register):
    from detkit.proposals.precomputed import PrecomputedSettings, SelectiveSearchSettings
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
def detkit_register_box_predictors(register):
    from detkit.models.roi_heads import SoftmaxBoxSettings
    from detkit.models.svm import SVMSettings

    register("softmax_box", _softmax_box, settings=SoftmaxBoxSettings, paper="Fast R-CNN, Sec. 2.2")
    # Not trained by SGD: fine-tuned with a softmax_box head first, then the SVMs and regressors are fitted.
    register("svm", _svm, settings=SVMSettings, schedule="svm_posthoc", finetune_predictor="softmax_box",
             paper="R-CNN, Sec. 2.3 (SVMs) and Appendix C (box regression)")


@hookimpl
def detkit_register_detectors(register):
    per_dataset = ("selective_search", "precomputed")
    register("rcnn", _rcnn, slots=_slots(per_dataset, ("warp",)), paper="Girshick et al. 2014")
    register("spp_net", _two_stage, slots=_slots(per_dataset, ("spp",)), paper="He et al. 2014")
    register("fast_rcnn", _two_stage, slots=_slots(per_dataset, ("roi_pool", "roi_align")), paper="Girshick 2015")
    register("faster_rcnn", _two_stage, slots=_slots(("rpn",)), paper="Ren et al. 2015")
    register("two_stage", _two_stage, slots=_slots(),
             paper="any proposal source, feature-map RoI extractor, box head and predictor")


@hookimpl
def detkit_register_datasets(register):
    # paths: the arguments that name files, made absolute when a run records its config (found from anywhere)
    register("coco", _coco, format="COCO json (pycocotools)", from_path=_coco_path, paths=("images", "annotations"),
             path_form="a COCO json file (images in images/ beside it, or --images)")
    register("voc", _voc, format="Pascal VOC devkit layout", from_path=_voc_path, paths=("root",),
             path_form="a VOC directory (with Annotations/)")
    register("yolo", _yolo, format="YOLO txt labels with a data.yaml (Ultralytics layout)", from_path=_yolo_path,
             paths=("data",), path_form="a YOLO data.yaml (--split, default train)")
    register("concat", _concat, format="several datasets with one class list (VOC 07+12)", parts="datasets")


@hookimpl
def detkit_register_classification_datasets(register):
    from detkit.classification import datasets

    register("image_folder", datasets.image_folder, format="root/<class>/<image> (torchvision ImageFolder layout)")
    register("image_list", datasets.image_list, format="CSV or JSON list of (image, label)")
    register("digits", datasets.digits, format="scikit-learn's bundled 8x8 handwritten digits (train/test split)")


def _jsonl(settings, context):
    import os

    from detkit.training.loggers import JsonlLogger

    return JsonlLogger(os.path.join(context.work_dir, "log.jsonl"))


def _csv(settings, context):
    import os

    from detkit.training.loggers import CsvLogger

    return CsvLogger(os.path.join(context.work_dir, settings.file), context.start_iter)


def _tensorboard(settings, context):
    import os

    from detkit.training.loggers import TensorBoardLogger

    return TensorBoardLogger(os.path.join(context.work_dir, settings.log_dir), context.start_iter, settings.flush_secs)


@hookimpl
def detkit_register_loggers(register):
    from detkit.training.loggers import CsvSettings, TensorBoardSettings

    register("jsonl", _jsonl, always=True, format="log.jsonl: one JSON object per logged iteration (always kept)")
    register("csv", _csv, settings=CsvSettings, format="log.csv: iter,name,value rows")
    register("tensorboard", _tensorboard, settings=TensorBoardSettings,
             format="TensorBoard event files (pip install 'detkit[tensorboard]')")


@hookimpl
def detkit_register_schedules(register):
    from .schedules import FourStepSettings

    register("end_to_end", _end_to_end, default=True,
             paper="one run of SGD; Faster R-CNN Sec. 3.2 (ii), approximate joint training")
    register("four_step", _four_step, settings=FourStepSettings, single_process=True,
             paper="Faster R-CNN, Sec. 3.2, 4-step alternating training")
    register("svm_posthoc", _svm_posthoc, single_process=True,
             paper="R-CNN Sec. 2.3, SPP-net Sec. 4.1: fine-tuning, then SVMs and box regression")
