"""The backbone interface every classification architecture implements.

A backbone is a classification network (its parameter names follow torchvision's
where torchvision has the architecture, so torchvision checkpoints load as they
are) that also says how to cut it for detection (Faster R-CNN paper, Sec. 4; the
ResNet paper, Appendix A): a *trunk* that maps an image to a feature map of
``out_channels`` channels at ``stride``, and a *RoI head* that maps pooled
region features ``(R, out_channels, S, S)`` to vectors ``(R, head_channels)``
(VGG's fc6/fc7, ResNet's res5 + global average pooling, ...). The detection
head (softmax classifier and box regressor, or SVMs) sits on those vectors.

Families follow timm's pattern: one model class per family, and a table of
:class:`Variant` rows, one per registered name, each giving the builder and its
fixed arguments, the keyword arguments a config may set (the builder's
signature), the paper, and the variant's defaults as data (input size,
mean/std, the RoI pooling size used in the literature, the smallest input:
:class:`BackboneDefaults`). :func:`register_variants` registers a table from a
plugin's ``detkit_register_backbones`` hook; registering a plain builder with
``register(name, builder, **info)`` works as well (it is what the table helper
does). The initialisation helpers at the end (:func:`init_weights`) replace the
families' hand-written loops over ``modules()``.

Weights of the same names and shapes can still mean another function: a ResNet bottleneck's stride on the
first 1x1 (the paper) or on the 3x3 (torchvision's checkpoints). A backbone for which that is so declares its
*weights layout* (:meth:`Backbone.weights_layout`, the builder arguments it depends on); detkit records it in
the weights files it writes (:meth:`Backbone.weights_state_dict`), and :meth:`Backbone.load_pretrained`
refuses a file whose layout is another, naming the ``model.backbone.args`` key to set.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

#: per-channel statistics of RGB images scaled to [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
#: mean = std = 0.5: inputs scaled to [-1, 1] (timm's IMAGENET_INCEPTION_MEAN/STD), what torchvision's
#: Inception checkpoints and several small-image networks expect
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneDefaults:
    """Per-variant defaults, declared next to the variant.

    input_size: (C, H, W) the classifier was designed for.
    mean, std: per-channel normalisation of RGB images scaled to [0, 1].
    roi_output_size: side of the RoI-pooled grid the RoI head expects
        (7 for VGG's fc6 on 7x7x512, 14 for ResNet-C4's res5, ...).
    min_input_size: the smallest square input the classifier accepts (tests use it).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    roi_output_size: int = 7
    min_input_size: int = 32


#: 32x32 CIFAR images with CIFAR statistics, 8x8 RoIs (the CIFAR forms of ResNet, DenseNet, FractalNet)
CIFAR_DEFAULTS = BackboneDefaults(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, roi_output_size=8,
                                  min_input_size=32)


@dataclass(init=False)
class DetectionParts:
    """What a detector takes from a backbone.

    trunk: image batch (B, 3, H, W) -> features (B, out_channels, ~H/stride, ~W/stride).
    box_head: the backbone's own box head (VGG's fc6/fc7, ResNet's res5): pooled regions
        (R, out_channels, S, S) -> (R, head_channels); the ``backbone`` box head of a detector.
    stages: the trunk's sub-modules in input-to-output order; ``freeze_at = k``
        freezes the first k of them (the papers fine-tune from conv3_1 for VGG-16
        and from res3 for ResNets).

    ``box_head=`` (the name of earlier releases) is still taken, with a deprecation warning.
    """

    trunk: nn.Module
    box_head: nn.Module
    out_channels: int
    stride: int
    head_channels: int
    stages: list[nn.Module]

    def __init__(self, trunk: nn.Module, box_head: nn.Module | None = None, out_channels: int = 0, stride: int = 0,
                 head_channels: int = 0, stages: list[nn.Module] | None = None, *, roi_head: nn.Module | None = None):
        if roi_head is not None:
            warnings.warn("DetectionParts(box_head=...) is deprecated: the backbone's own head is box_head",
                          DeprecationWarning, stacklevel=2)
            box_head = roi_head if box_head is None else box_head
        if box_head is None or not out_channels or not stride or not head_channels:
            raise TypeError("DetectionParts needs trunk, box_head, out_channels, stride and head_channels")
        self.trunk, self.box_head, self.out_channels, self.stride = trunk, box_head, out_channels, stride
        self.head_channels, self.stages = head_channels, list(stages or [])

    @property
    def roi_head(self) -> nn.Module:
        """Deprecated name of :attr:`box_head`."""
        warnings.warn("DetectionParts.roi_head is deprecated: use box_head", DeprecationWarning, stacklevel=2)
        return self.box_head


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a backbone exposes (timm's ``feature_info``, Detectron2's ``output_shape()``): the
    output of a stage, ``channels`` deep at ``stride`` (input pixels per feature-map cell)."""

    name: str
    channels: int
    stride: int


@dataclass
class FeatureStages:
    """The backbone's convolutional body as stages applied one after the other to the image batch, each
    stage's output a feature map a neck may read (FPN reads the last map at each stride 4, 8, 16, 32).

    stages: modules sharing parameters with the classifier, in input-to-output order; ``stages[i]`` maps
        the output of ``stages[i - 1]`` (the image for i = 0) to the map ``info[i]`` describes.
    info: one :class:`FeatureInfo` per stage.
    """

    stages: list[nn.Module]
    info: list[FeatureInfo]

    def __post_init__(self):
        if len(self.stages) != len(self.info) or not self.stages:
            raise ValueError(f"FeatureStages: {len(self.stages)} stages but {len(self.info)} FeatureInfo entries")

    def last_at_each_stride(self) -> dict[int, int]:
        """stride -> index of the last stage whose output has that stride."""
        return {info.stride: i for i, info in enumerate(self.info)}


class Backbone(nn.Module):
    """Base class of every registered backbone.

    Subclasses are complete classification models: ``forward(images)`` returns
    logits ``(B, num_classes)`` (training-time auxiliary outputs are allowed;
    then ``classification_loss`` must combine them). They implement
    :meth:`detection_parts`, which returns modules that *share parameters* with
    the classification model (no copies), so ImageNet weights loaded into the
    classifier are the detector's initialisation.
    """

    defaults: BackboneDefaults = BackboneDefaults()

    def detection_parts(self) -> DetectionParts:
        raise NotImplementedError(f"{type(self).__name__} does not define detection_parts()")

    def feature_stages(self) -> FeatureStages:
        """The conv body as stages with declared channels and strides (for necks such as FPN). The stages
        share parameters with the classifier and cover the network up to its last convolutional map
        (stride 32 for ImageNet forms), including what :meth:`detection_parts` puts in the RoI head."""
        raise NotImplementedError(f"{type(self).__name__} exposes no feature stages (feature_stages())")

    def classification_loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``forward``'s outputs against class indices ``targets (B,)``."""
        return nn.functional.cross_entropy(outputs, targets)

    def remap_state_dict(self, state: dict) -> dict:
        """Rename keys of an older checkpoint layout to this model's (identity by default)."""
        return state

    # ------------------------------------------------------------------------- weights layout

    def weights_layout(self) -> dict[str, Any]:
        """What the function of this model's weights depends on beyond their names and shapes: builder
        arguments (keys of ``model.backbone.args``) -> this model's values, plain data (a ResNet bottleneck's
        ``{"stride_in_1x1": True}``). Weights trained with other values load without a complaint from their
        shapes and compute something else, so files record it and loading compares it. ``{}`` (the default):
        nothing does."""
        return {}

    def assumed_weights_layout(self) -> tuple[dict[str, Any], str] | None:
        """The layout a weights file that records none (written outside detkit, in this backbone's naming) is
        taken to have, and whose layout that is (``"torchvision's"``); None (the default): no assumption, such
        a file loads as configured."""
        return None

    def describe_weights_layout(self, layout: Mapping[str, Any]) -> str:
        """``layout`` in words for messages: ``key=value, ...`` (a family may add what the values mean)."""
        return _layout_text(layout)

    def weights_state_dict(self) -> dict:
        """``state_dict()`` with :meth:`weights_layout` recorded in it (when there is one): what detkit writes as
        a weights file for ``model.backbone.weights`` (``backbone.pth``)."""
        from detkit.engine.state_dict import record_weights_layout

        layout = self.weights_layout()
        return record_weights_layout(self.state_dict(), layout) if layout else self.state_dict()

    def load_pretrained(self, path: str | os.PathLike, strict: bool = False, *,
                        declared_layout: Mapping[str, Any] | None = None,
                        settings: str = "model.backbone") -> list[str]:
        """Load a torchvision-format state dict from a local file.

        A tensor whose shape differs is skipped when it is the classifier's (a 1000-class ImageNet checkpoint
        into a model with another number of classes): one the detector does not use, or one that differs in
        its first dimension alone. Raises WeightsError (a ValueError naming the file and the first mismatches)
        when a tensor of the trunk or the RoI head differs in another dimension (weights of another depth or
        width), or when no trunk parameter is in the file (weights of another architecture).
        With a :meth:`weights_layout`, also when the file's layout is not the model's (see
        :meth:`check_weights_layout`; ``declared_layout``: the user's statement of the layout of a file that
        records none, ``settings``: the config section of the backbone, for messages).
        Logs the counts of loaded, missing, unexpected and skipped tensors. Returns the names of the
        model's tensors that were not loaded.
        """
        from detkit.engine.state_dict import WeightsError, read_state_dict, recorded_weights_layout

        path = os.fspath(path)
        stored = read_state_dict(path, "pretrained weights file")
        recorded = recorded_weights_layout(stored)
        state = self.remap_state_dict(dict(stored))
        own = self.state_dict()
        used, trunk = self._detection_parameter_names()
        skipped = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        wrong = [k for k in skipped if k in used]  # a wrapper of the whole classifier (timm) holds its fc too
        if any(own[k].dim() != state[k].dim() or own[k].shape[1:] != state[k].shape[1:] for k in wrong):
            shapes = ", ".join(f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})" for k in wrong[:4])
            raise WeightsError(f"{path}: {len(wrong)} tensors of the trunk or RoI head have other shapes than "
                               f"{type(self).__name__}'s: {shapes}{', ...' if len(wrong) > 4 else ''}; weights of "
                               f"another variant (depth, width) of the architecture?")
        loadable = {k: v for k, v in state.items() if k in own and k not in skipped}
        if trunk and not any(k in loadable for k in trunk):
            raise WeightsError(f"{path}: none of the {len(trunk)} trunk parameters of {type(self).__name__} is in "
                               f"the file (it holds {len(state)} tensors such as {_names(state)}; the backbone's "
                               f"are named like {_names(trunk)}): weights of another architecture?")
        # Only now that the names fit is the file this architecture's, in the naming a layout is assumed for.
        self.check_weights_layout(path, recorded, declared_layout, settings)
        unexpected = [k for k in state if k not in own]
        if unexpected and strict:
            raise ValueError(f"{path}: {len(unexpected)} keys not in {type(self).__name__}, e.g. {unexpected[:3]}")
        missing = list(self.load_state_dict(loadable, strict=False).missing_keys)
        if strict and [m for m in missing if not any(m.startswith(s.rsplit('.', 1)[0]) for s in skipped)]:
            raise ValueError(f"{path}: missing {len(missing)} keys, e.g. {missing[:3]}")
        lost = [k for k in trunk if k not in loadable]
        (log.warning if lost else log.info)(
            "%s: loaded %d of %d tensors of %s (%d missing%s, %d unexpected, %d skipped for their shape%s)", path,
            len(loadable), len(own), type(self).__name__, len(missing),
            f", {len(lost)} of them in the trunk: {_names(lost)}" if lost else "", len(unexpected), len(skipped),
            f": {_names(skipped)}" if skipped else "")
        return missing

    def check_weights_layout(self, path: str, recorded: Mapping[str, Any] | None,
                             declared: Mapping[str, Any] | None = None, settings: str = "model.backbone") -> None:
        """Raise WeightsError when the weights file at ``path`` was trained in another layout than this model's.

        The file's layout is the one it records (``recorded``, what detkit writes), else the one the user
        declares (``declared``, ``<settings>.weights_layout``), else :meth:`assumed_weights_layout`; with none
        of them, or no :meth:`weights_layout`, nothing is checked. Logs which layout the file has and where
        that came from. The message names the ``<settings>.args`` keys to set.
        """
        from detkit.engine.state_dict import WeightsError

        model = self.weights_layout()
        if not model:
            return
        assumed = None
        if recorded is not None:
            conflict = {k: v for k, v in (declared or {}).items() if k in recorded and recorded[k] != v}
            if conflict:
                raise WeightsError(f"{path}: the file records that its weights were trained with "
                                   f"{self.describe_weights_layout({k: recorded[k] for k in conflict})}, not "
                                   f"{_layout_text(conflict)} as {settings}.weights_layout says: remove "
                                   f"{settings}.weights_layout (it is for files that record no layout)")
            layout, source = dict(recorded), "recorded in the file"
        elif declared:
            layout, source = dict(declared), f"{settings}.weights_layout"
        else:
            assumed = self.assumed_weights_layout()
            if assumed is None:
                return
            layout, source = dict(assumed[0]), f"{assumed[1]}, assumed for a file without a record"
        log.info("%s: weights layout %s: %s", path, self.describe_weights_layout(layout), source)
        differ = {k: v for k, v in layout.items() if k in model and model[k] != v}
        if not differ:
            return
        trained = self.describe_weights_layout(differ)
        configured = _layout_text({k: model[k] for k in differ})
        fix = ", ".join(f"{settings}.args.{k}: {json.dumps(v)}" for k, v in differ.items())
        if recorded is not None:
            raise WeightsError(f"{path}: its weights were trained with {trained}; the model is configured with "
                               f"{configured}: set {fix}")
        if declared:
            raise WeightsError(f"{path}: {settings}.weights_layout says its weights were trained with {trained}; "
                               f"the model is configured with {configured}: set {fix}")
        own = {k: model[k] for k in differ}
        raise WeightsError(f"{path}: the file records no weights layout, so it is taken for {assumed[1]}: its "
                           f"weights were trained with {trained}; the model is configured with {configured}: set "
                           f"{fix}; or, if the file was trained with {configured} (elsewhere, or by a detkit "
                           f"release that did not record it), say so with {settings}.weights_layout: "
                           f"{_layout_yaml(own)}")

    def _detection_parameter_names(self) -> tuple[set[str], list[str]]:
        """The names of the parameters the detector uses (the trunk's and the RoI head's) and of the trunk's;
        every parameter when the backbone defines no detection parts."""
        names = {id(p): n for n, p in self.named_parameters()}
        try:
            with torch.random.fork_rng(devices=[]):  # a part built here must not shift later random draws
                parts = self.detection_parts()
        except NotImplementedError:
            return set(names.values()), list(names.values())
        trunk = [names[id(p)] for p in parts.trunk.parameters() if id(p) in names]
        head = [names[id(p)] for p in parts.box_head.parameters() if id(p) in names]
        return set(trunk) | set(head), trunk


def _layout_text(layout: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in layout.items())


def _layout_yaml(layout: Mapping[str, Any]) -> str:
    """``{key: value, ...}`` as a YAML flow mapping (what a config file or ``--set`` takes)."""
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in layout.items()) + "}"


def _names(keys: Iterable[str], shown: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- variant tables

#: a variant's defaults: data, or a function of the builder's arguments (when they change the input, e.g. its size)
DefaultsSpec = Union[BackboneDefaults, Callable[..., BackboneDefaults]]


@dataclass(frozen=True, eq=False)
class Variant:
    """One row of a family's table: one registered backbone (timm's pattern: the family's model class, called
    with this variant's arguments). A row is itself the registered builder.

    name: the registered name.
    model: the family's model class (or a function assembling the model), called as
        ``model(**args, **options)``; it returns a :class:`Backbone`.
    paper: short citation, shown by ``detkit list``.
    defaults: the variant's :class:`BackboneDefaults`, set on every model built (as timm attaches its
        ``pretrained_cfg``), or a function of the model's arguments returning them (for a variant whose
        input size is an option). The model class's own ``defaults`` apply to a model built directly.
    args: the fixed arguments of ``model`` that make this variant (block type, layer counts, widths, ...).
    options: the keyword arguments a config may set (``model.backbone.args``) with this variant's default
        values, in order, ``num_classes`` first. They are the builder's signature, so configs are checked
        against them (an unknown key is an error).
    doc: what the variant is, in a sentence.
    """

    name: str
    model: Callable[..., Backbone]
    paper: str
    defaults: DefaultsSpec
    args: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=lambda: {"num_classes": 1000})
    doc: str = ""

    def __post_init__(self):
        if "num_classes" not in self.options:
            raise ValueError(f"backbone variant {self.name!r}: options must include num_classes")
        shared = sorted(set(self.args) & set(self.options))
        if shared:
            raise ValueError(f"backbone variant {self.name!r}: {shared} both fixed (args) and settable (options)")
        # What inspect.signature() reports for the row, so configs are validated against the options.
        params = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
                  for k, v in self.options.items()]
        object.__setattr__(self, "__signature__", inspect.Signature(params))

    def __call__(self, *args, **kwargs) -> Backbone:
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = {**self.args, **bound.arguments}
        model = self.model(**arguments)
        model.defaults = self.defaults(**arguments) if callable(self.defaults) else self.defaults
        return model

    def __repr__(self) -> str:
        return f"Variant({self.name!r}, {getattr(self.model, '__name__', self.model)!r}, paper={self.paper!r})"


def register_variants(register: Callable[..., None], variants: Iterable[Variant], family: str, **info) -> None:
    """Register every row of a family's table: ``register(row.name, row, family=family, paper=row.paper, **info)``.

    register: the callback a ``detkit_register_backbones`` hook receives.
    """
    for variant in variants:
        register(variant.name, variant, family=family, paper=variant.paper, **info)


# ----------------------------------------------------------------------------- weight initialisation

InitFn = Callable[[torch.Tensor], Any]


def init_weights(model: nn.Module, conv: InitFn | None = None, linear: InitFn | None = None,
                 bias: float | None = None, exclude: Iterable[nn.Module] = ()) -> None:
    """Initialise ``model`` in one pass over ``model.modules()`` (the order of a hand-written loop, so the
    random draws are the same): ``conv(weight)`` for each ``nn.Conv2d``, ``linear(weight)`` for each
    ``nn.Linear`` (``None``: leave as constructed), their biases set to ``bias`` (``None``: leave them), and
    batch norm to weight 1, bias 0. Modules in ``exclude`` are skipped (initialise them afterwards: if they
    come last in ``modules()`` the draws are still in loop order).
    """
    skip = {id(m) for m in exclude}
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rule = conv if isinstance(m, nn.Conv2d) else linear
            if rule is not None:
                rule(m.weight)
            if bias is not None and m.bias is not None:
                nn.init.constant_(m.bias, bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def normal_init(std: float) -> InitFn:
    """N(0, std^2) weights."""
    return partial(nn.init.normal_, mean=0.0, std=std)


def trunc_normal_init(std: float) -> InitFn:
    """N(0, std^2) truncated to [-2, 2] (torchvision's GoogLeNet and Inception-v3)."""
    return partial(nn.init.trunc_normal_, mean=0.0, std=std, a=-2, b=2)


def kaiming_normal_init(mode: str = "fan_in") -> InitFn:
    """He et al. 2015: N(0, 2 / n) for ReLU networks, n the fan-in (``"fan_in"``, the paper's Eq. 10) or the
    fan-out (``"fan_out"``, torchvision's ResNet and VGG)."""
    return partial(nn.init.kaiming_normal_, mode=mode, nonlinearity="relu")
