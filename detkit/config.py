"""Configuration: YAML files validated into typed dataclasses.

A config file is plain data. It may name a ``base:`` file (a path relative to itself) whose contents it
is merged over: mappings merge key by key, anything else replaces (and so does a mapping whose ``name``
names another component). The merged data is validated against :class:`Config`: an unknown key fails
with its full path and the closest valid key, a wrong type names the expected type, and a number outside
the range its field declares (:func:`ranged`) names the value and the range. A number may be written in
any spelling Python's ``float()`` reads (``1e-3``, which YAML 1.1 leaves a string). ``--set a.b=value``
overrides are parsed as YAML scalars and typed by the schema; a bad value one gave is blamed on it.
Defaults are the settings of the Faster R-CNN paper (Ren et al., 2015, Sec. 3.1.3 and 3.3) and Fast
R-CNN (Girshick, 2015, Sec. 2.3).

Parts are chosen by registered name. The model's registered parts own their settings: a section
``{name: ..., <keys>}`` (:class:`PartConfig`) is checked by :func:`bind_parts` against the settings
dataclass its part was registered with (it needs the plugin registries, so loading a file without them
leaves the keys unchecked until the model is built). The backbone's builder arguments
(``model.backbone.args``) and the datasets' own keys (``data.train``) are checked against the registered
builder's signature when they are built. Keys of the earlier layout load with a warning that names the
key replacing them (:func:`migrate_legacy`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """Invalid configuration: the message names the file and key path."""


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts: a finite number within the given bounds (``ge``/``gt`` below,
    ``le``/``lt`` above). A list is checked element by element; None (an optional key left unset) is not
    checked."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        finite = isinstance(value, int) or math.isfinite(value)  # (an int may be too large for math.isfinite)
        return (finite and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        lo, hi = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        up, close = (self.le, "]") if self.le is not None else (self.lt, ")")
        if lo is not None and up is not None:
            return f"in {hi}{lo:g}, {up:g}{close}"
        if lo is not None:
            return f"{'>=' if hi == '[' else '>'} {lo:g}"
        return f"{'<=' if close == ']' else '<'} {up:g}" if up is not None else "finite"


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose value the config loader checks against a :class:`Range` (a part's settings
    class uses it too): ``lr: float = ranged(0.001, gt=0)``, ``positive_fraction: float = ranged(0.5, ge=0, le=1)``.
    A value outside fails with the key, the value and the range."""
    return field(default=default, default_factory=default_factory,
                 metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


# ----------------------------------------------------------------------------- schema


@dataclass
class BackboneConfig:
    name: str = "tiny"
    weights: str | None = None  # local torchvision-format state dict; nothing is downloaded
    # freeze the first k trunk stages; -1: the whole trunk (SPP-net fine-tunes fc only)
    freeze_at: int = ranged(0, ge=-1)
    frozen_bn: bool | None = None  # None: frozen when `weights` is given, trainable otherwise
    args: dict = field(default_factory=dict)  # extra keyword arguments of the variant's builder


@dataclass
class PartConfig:
    """A registered part chosen by name, with that part's own settings.

    In a file the section is ``{name: roi_align, sampling_ratio: 2}`` (a bare string ``roi_align`` is
    ``{name: roi_align}``). Before the config is bound to the plugin registries (:func:`bind_parts`),
    ``settings`` holds the given keys as a mapping; after, an instance of the settings dataclass the part was
    registered with, every default filled in.
    """

    name: str
    settings: Any = field(default_factory=dict)

    @property
    def bound(self) -> bool:
        return dataclasses.is_dataclass(self.settings)


@dataclass
class RoIHeadsConfig:
    """The second stage's own settings (torchvision's ``RoIHeads``, Detectron2's ``ROI_HEADS``): training
    samples (Fast R-CNN Sec. 2.3), box targets and loss (Eq. 1-3), test-time post-processing."""

    batch_size_per_image: int = ranged(128, ge=1)
    positive_fraction: float = ranged(0.25, ge=0, le=1)
    fg_iou_thresh: float = ranged(0.5, ge=0, le=1)
    bg_iou_thresh_hi: float = ranged(0.5, ge=0, le=1)
    bg_iou_thresh_lo: float = ranged(0.1, ge=0, le=1)
    add_gt_as_proposals: bool = True
    box_coder_weights: list[float] = ranged(default_factory=lambda: [10.0, 10.0, 5.0, 5.0], gt=0)
    box_loss_weight: float = ranged(1.0, ge=0)
    smooth_l1_beta: float = ranged(1.0, ge=0)
    score_thresh: float = 0.05  # any number: the SVM predictor's scores are margins, not probabilities
    nms_thresh: float = ranged(0.3, ge=0, le=1)
    detections_per_img: int = ranged(100, ge=1)


@dataclass
class TransformConfig:
    # a list: drawn per image in training (multi-scale); 0: the image's own size (R-CNN warps from it)
    min_size: int | list[int] = ranged(600, ge=0)
    max_size: int = ranged(1000, ge=1)
    mean: list[float] | None = None  # None: the backbone's
    std: list[float] | None = ranged(None, gt=0)
    size_divisible: int | None = ranged(None, ge=1)  # None: the backbone's stride
    # Multi-scale testing (SPP-net Sec. 3.2, Fast R-CNN Sec. 5.2): features at each shorter side; every
    # region is pooled from the scale at which its area is closest to 224 x 224. None: min_size only.
    test_scales: list[int] | None = ranged(None, ge=1)


#: the model's part sections: config key -> registry kind
PART_KINDS = {"neck": "necks", "proposal_generator": "proposal_generators", "roi_extractor": "roi_extractors",
              "box_head": "box_heads", "box_predictor": "heads"}


@dataclass
class ModelConfig:
    detector: str = "faster_rcnn"
    num_classes: int | None = ranged(None, ge=1)  # object classes without background; None: from the training set
    class_names: list[str] | None = None  # filled from the training set when training
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # The registered parts, each a section {name: ..., <that part's settings>} (`detkit list` names them,
    # `detkit config show` prints their resolved settings).
    neck: PartConfig | None = None  # e.g. {name: fpn}: feature maps of several strides; None: the trunk's one map
    proposal_generator: PartConfig = field(default_factory=lambda: PartConfig("rpn"))  # rpn | selective_search | ...
    roi_extractor: PartConfig = field(default_factory=lambda: PartConfig("roi_pool"))
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    box_head: PartConfig = field(default_factory=lambda: PartConfig("backbone"))  # backbone (fc6/fc7, res5) | two_fc | ...
    box_predictor: PartConfig = field(default_factory=lambda: PartConfig("softmax_box"))  # on the box head's vectors
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class AugmentConfig:
    hflip: float = ranged(0.5, ge=0, le=1)  # probability of a horizontal flip (Faster R-CNN: flipped images)
    # [lo, hi]: zoom the content by a factor drawn from it (image size kept)
    scale: list[float] | None = ranged(None, gt=0)
    crop: float = ranged(0.0, ge=0, le=1)  # probability of a random crop that keeps every box whole
    color_jitter: float = ranged(0.0, ge=0, le=1)  # probability of brightness/contrast/saturation/hue jitter


@dataclass
class DataConfig:
    # A dataset is `{name: <registered dataset>, ...its builder's keyword arguments}`.
    train: dict | None = None
    test: dict | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = ranged(1, ge=1)  # images per iteration (Faster R-CNN end-to-end: 1)
    num_workers: int = ranged(2, ge=0)
    skip_empty: bool = True  # training skips images with no objects
    group_by_aspect_ratio: bool = False  # batches of only landscape or only portrait images


@dataclass
class TrainConfig:
    work_dir: str = "work_dirs/run"
    max_iters: int = ranged(80000, ge=1)
    lr: float = ranged(0.001, gt=0)
    momentum: float = ranged(0.9, ge=0, le=1)
    weight_decay: float = ranged(0.0005, ge=0)
    warmup_iters: int = ranged(0, ge=0)
    warmup_factor: float = ranged(0.001, ge=0, le=1)
    # step: x gamma at each of `steps` (the detection papers'); cosine: half a cosine from lr to 0 over max_iters
    # (Loshchilov & Hutter 2017), after the warmup
    lr_schedule: str = "step"
    steps: list[int] = ranged(default_factory=lambda: [60000], ge=0)
    gamma: float = ranged(0.1, gt=0)
    clip_grad_norm: float | None = ranged(None, gt=0)
    checkpoint_period: int = ranged(5000, ge=0)  # 0: no periodic checkpoints (final.pth only)
    log_period: int = ranged(20, ge=1)
    eval_at_end: bool = True
    seed: int = ranged(0, ge=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16 with a gradient scaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the trunk
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA) when trainable BN is used
    # Linear scaling rule (Goyal et al. 2017): lr and warmup are given for one process;
    # with N processes the global batch is N times larger and lr is multiplied by N.
    scale_lr: bool = True
    # end_to_end: approximate joint training (Faster R-CNN Sec. 3.2 (ii)); four_step: alternating training
    # (Sec. 3.2, 4-step), with four_step_iters iterations per step and the learning rate divided by 10 at
    # three quarters of each step (py-faster-rcnn's schedule).
    schedule: str = "end_to_end"
    four_step_iters: list[int] = ranged(default_factory=lambda: [80000, 40000, 80000, 40000], ge=1)
    # Training images that cannot be decoded are skipped (named in the log, counted at the end) up to this
    # many; one more stops training. Missing or empty files stop it before the first iteration.
    max_bad_images: int = ranged(10, ge=0)


@dataclass
class TileSettings:
    """Tiled inference (:mod:`detkit.tiling`, which uses it; it lives here so that the config imports no
    torch): an image far larger than the network's input is cut into overlapping ``size`` x ``size`` windows
    at native resolution, each window is detected as an image of its own, and the detections are merged."""

    size: int = ranged(0, ge=0)  # window side in pixels; 0: no tiling (the whole image, resized by the model)
    overlap: float = ranged(0.2, ge=0, lt=1)  # share of a window its neighbours also cover (>= the objects' size)
    # nms: of two boxes of one class with IoU >= iou_thresh, the less confident goes; larger: of two with
    # intersection over the smaller box >= ios_thresh, the smaller goes; ios: such boxes become their union
    merge: str = "nms"
    iou_thresh: float = ranged(0.5, ge=0, le=1)
    ios_thresh: float = ranged(0.6, ge=0, le=1)
    # a box within this many pixels of a window edge inside the image is cut by it; it is dropped where
    # another window (or the whole-image pass) sees the object whole (ios_thresh of the cut box inside)
    edge_margin: float = ranged(2.0, ge=0)
    batch: int = ranged(4, ge=1)  # windows per forward pass
    full_image: bool = False  # also the whole image at the model's own size (keeps objects larger than a window)


@dataclass
class EvalConfig:
    metric: str = "coco"  # coco | voc07 (11-point) | voc (VOC2010+ area under the curve)
    backend: str = "faster_coco_eval"  # or pycocotools (COCO metric)
    score_thresh: float | None = None  # None: model.roi_heads.score_thresh
    tile: TileSettings = field(default_factory=TileSettings)  # size > 0: tiled inference (detkit.tiling)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- classification (detkit pretrain)


@dataclass
class ClassifierBackboneConfig:
    name: str = "tiny"
    weights: str | None = None  # a local state dict to start from (torchvision naming), e.g. an earlier backbone.pth
    args: dict = field(default_factory=dict)  # keyword arguments of the variant's builder (aux_logits, dropout, ...)


@dataclass
class ClassifierModelConfig:
    backbone: ClassifierBackboneConfig = field(default_factory=ClassifierBackboneConfig)
    num_classes: int | None = ranged(None, ge=1)  # None: the training set's classes
    class_names: list[str] | None = None  # filled from the training set
    input_size: int | None = ranged(None, ge=8)  # side of the square input; None: the backbone's design input
    mean: list[float] | None = None  # None: the backbone's
    std: list[float] | None = ranged(None, gt=0)


@dataclass
class ClassifierAugmentConfig:
    # resized: a crop of a random area fraction (`area`) and aspect ratio (`ratio`), resized to the input (GoogLeNet
    # Sec. 6, "scale augmentation" of torchvision's recipes); scale_jitter: the shorter side resized to a random
    # multiple (`scale_jitter`) of the input side, then a random crop (VGG Sec. 3.1: S in [256, 512] for 224);
    # center: no random crop (the test-time resize and centre crop)
    crop: str = "resized"
    area: list[float] = ranged(default_factory=lambda: [0.08, 1.0], gt=0, le=1)
    ratio: list[float] = ranged(default_factory=lambda: [3 / 4, 4 / 3], gt=0)
    scale_jitter: list[float] = ranged(default_factory=lambda: [256 / 224, 512 / 224], ge=1)
    hflip: float = ranged(0.5, ge=0, le=1)  # probability of a horizontal flip
    color_jitter: float = ranged(0.0, ge=0, le=1)  # strength of brightness/contrast/saturation jitter (0.4: AlexNet-like)
    test_resize: float = ranged(256 / 224, ge=1)  # shorter side / input side before the test-time centre crop


@dataclass
class ClassifierDataConfig:
    # A dataset is `{name: <registered classification dataset>, ...its builder's keyword arguments}`
    # (`detkit list classification_datasets`): image_folder, image_list, digits.
    train: dict | None = None
    test: dict | None = None
    augment: ClassifierAugmentConfig = field(default_factory=ClassifierAugmentConfig)
    batch_size: int = ranged(64, ge=1)
    num_workers: int = ranged(2, ge=0)


@dataclass
class ClassifierEvalConfig:
    period: int = ranged(0, ge=0)  # validation top-1/top-5 every this many iterations (0: at the end only)
    ten_crop: bool = False  # 10-crop testing (AlexNet Sec. 4.1, GoogLeNet Sec. 7) at the end of training


@dataclass
class ClassifierConfig:
    """``detkit pretrain``: a backbone trained as a classifier, with the detector's ``train:`` section."""

    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class Origin:
    """Where a config's values came from: a file (or a checkpoint's embedded config) and the ``--set``
    overrides applied over it. ``str()`` is the file; :meth:`of` names what gave the key at a path."""

    def __init__(self, file: str, overrides: list[tuple[list[str], str]]):
        self.file = file
        self.overrides = list(overrides)

    def of(self, path: str) -> str:
        """``--set KEY=VALUE`` for a key that override wrote (the last one covering ``path`` wins, as it was
        applied last), else the file."""
        keys = re.sub(r"\[\d+\]", "", path).split(".")
        for override_keys, text in reversed(self.overrides):
            if keys[: len(override_keys)] == override_keys:
                return f"--set {text}"
        return self.file

    def __str__(self) -> str:
        return self.file


def _at(source: str | Origin, path: str) -> str:
    """The source to name in a message about the key at ``path``."""
    return source.of(path) if isinstance(source, Origin) else str(source)


def _number(value: Any) -> int | float | None:
    """``value`` as a number, or None (bools are not numbers). A string is read as Python reads numbers:
    YAML 1.1 reads ``1e-3``, ``1E4`` and ``5e+2`` as strings, and users write them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _convert(value: Any, tp: Any, path: str, source: str | Origin) -> Any:
    """Check ``value`` against type ``tp`` and return it converted: int -> float, any spelling ``float()``
    reads -> float (NaN is no value), an integral number or spelling -> int ("1e3" -> 1000, "2.5" fails)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{_at(source, path)}: {path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build_dataclass(tp, value, path, source)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (arg,) = typing.get_args(tp)
            return [_convert(v, arg, f"{path}[{i}]", source) for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
    elif tp is float:
        number = _number(value)
        try:
            number = None if number is None else float(number)
        except OverflowError:  # an integer beyond the float range
            number = None
        if number is not None and not math.isnan(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{_at(source, path)}: {path}: expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _check_range(f: dataclasses.Field, value: Any, path: str, source: str | Origin) -> None:
    """Fail naming the key, the value and the allowed range when a number of ``value`` (a number, or a list
    of them) lies outside the range the field declares (:func:`ranged`)."""
    bounds = f.metadata.get("range")
    if bounds is None or value is None:
        return
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not bounds.admits(v):
            key = f"{path}[{i}]" if isinstance(value, list) else path
            kind = "an integer" if isinstance(v, int) else "a number"
            raise ConfigError(f"{_at(source, key)}: {key}={v!r}: expected {kind} {bounds}")


def _closest(key: str, valid: list[str], parent: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    prefix = f"{parent}." if parent else ""
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _build_dataclass(cls: type, data: dict, path: str, source: str | Origin):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"{_at(source, full)}: unknown key {full!r}{_closest(str(key), list(fields), path)}")
        if PartConfig in (hints[key], *typing.get_args(hints[key])):  # a part section (or None, if optional)
            optional = hints[key] is not PartConfig
            kwargs[key] = None if optional and value is None else _part(
                value, _default_part_name(fields[key]), full, source)
        else:
            kwargs[key] = _convert(value, hints[key], full, source)
            _check_range(fields[key], kwargs[key], full, source)
    return cls(**kwargs)


def _default_part_name(f: dataclasses.Field) -> str | None:
    """The name of the part a part field chooses by default (None for an optional part left out)."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return getattr(default, "name", None)


def _part(value: Any, default_name: str, path: str, source: str | Origin) -> PartConfig:
    """A part section: a registered name, or ``{name: ..., <settings>}`` (no ``name``: the default part)."""
    if isinstance(value, PartConfig):
        return copy.deepcopy(value)
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{_at(source, path)}: {path}: expected a registered name or a mapping "
                          f"{{name: ..., <its settings>}}, got {value!r}")
    settings = copy.deepcopy(value)
    name = settings.pop("name", default_name)
    if name is None:
        raise ConfigError(f"{_at(source, path)}: {path}.name: missing (a registered name chooses the part)")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{_at(source, path + '.name')}: {path}.name: expected a registered name, got {name!r}")
    return PartConfig(name, settings)


@dataclass
class NoSettings:
    """The settings of a part registered without a settings class: it takes no config keys."""


def bind_parts(cfg: Config | ModelConfig, registries, source: str | Origin = "config") -> Config | ModelConfig:
    """Validate each part section of the model against the settings class its part was registered with
    (unknown keys get the closest valid key, wrong types the expected type, numbers out of range the range)
    and replace the given keys by that class's instance, defaults filled in. Bound sections are left as they
    are. A key a ``--set`` override gave is blamed on it (:func:`from_dict` keeps the overrides of
    :func:`apply_overrides`' data). Returns ``cfg``."""
    from detkit.plugins import UnknownNameError

    model = cfg.model if isinstance(cfg, Config) else cfg
    given = getattr(cfg, "_origin", None)
    if isinstance(given, Origin) and not isinstance(source, Origin):
        source = Origin(str(source), given.overrides)
    for key, kind in PART_KINDS.items():
        part = getattr(model, key)
        if part is None:  # an optional part left out (model.neck)
            continue
        try:
            entry = registries.kind(kind).get(part.name)
        except UnknownNameError as exc:
            raise ConfigError(f"{_at(source, f'model.{key}.name')}: model.{key}.name: {exc}") from None
        cls = entry.settings or NoSettings
        if part.bound:
            if not isinstance(part.settings, cls):
                raise ConfigError(f"{source}: model.{key}: holds the settings of another part "
                                  f"({type(part.settings).__name__}), not of {part.name!r}")
            continue
        _drop_shared_legacy_keys(key, part, cls, source)
        if cls is NoSettings and part.settings:
            raise ConfigError(f"{_at(source, f'model.{key}')}: model.{key}: {kind[:-1]} {part.name!r} takes no "
                              f"settings, got {', '.join(map(repr, part.settings))}")
        part.settings = _build_dataclass(cls, part.settings, f"model.{key}", source)
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        # A part given by its name alone is the mapping {name: ...}: the same name keeps the base's settings.
        if isinstance(value, str) and isinstance(old, dict) and old.get("name") == value:
            value = {"name": value}
        if isinstance(old, str) and isinstance(value, dict) and value.get("name", old) == old:
            old = out[key] = {"name": old}
        # A part that names another registered component replaces the base's part instead of merging
        # into it (its keys belong to another builder).
        swapped = isinstance(value, dict) and isinstance(old, dict) and "name" in value and value.get("name") != old.get("name")
        if isinstance(value, dict) and isinstance(old, dict) and not swapped:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict:
    """Read a config file and its ``base:`` chain into one merged mapping."""
    path = os.path.abspath(os.fspath(path))
    if path in _chain:
        raise ConfigError(f"{path}: circular base chain: {' -> '.join(_chain + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path (string), got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    return _deep_merge(load_yaml(base_path, _chain + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: empty key in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _field_type(cls: Any, keys: list[str]) -> Any:
    """The schema type at ``keys`` below dataclass ``cls`` (None inside free-form mappings)."""
    tp = cls
    for k in keys:
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if k not in hints:
                return None
            tp = hints[k]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
                tp = args[0]
        else:
            return None
    return tp


class _Overridden(dict):
    """Config data with ``--set`` overrides applied; ``overrides`` lists ``(key path, "KEY=VALUE")`` in the
    order applied, so that :func:`from_dict` blames a bad value on the override that gave it, not the file."""

    overrides: list[tuple[list[str], str]]


yaml.SafeDumper.add_representer(_Overridden, yaml.SafeDumper.represent_dict)  # it dumps as the mapping it is


def apply_overrides(data: dict, overrides: list[str], schema: type = Config) -> dict:
    """``data`` (not modified) with each ``KEY.PATH=VALUE`` of ``overrides`` set in turn (values parsed as
    YAML scalars, typed by ``schema``); the result remembers which keys the overrides gave (see
    :class:`_Overridden`)."""
    previous = list(data.overrides) if isinstance(data, _Overridden) else []
    data = _Overridden(copy.deepcopy(data))
    data.overrides = previous
    for text in overrides:
        keys, value = parse_override(text)
        tp = _field_type(schema, keys)
        # "--set train.lr=1" must give a float and "--set model.class_names=a" stays a string list error;
        # a YAML-parsed number for a str field is taken back as its text.
        if tp is str and value is not None and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()
        node = data
        for k in keys[:-1]:
            if isinstance(node.get(k), str):  # a part given by name: its settings go beside the name
                node[k] = {"name": node[k]}
            elif not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        old = node.get(keys[-1])
        if isinstance(value, str) and isinstance(old, dict) and old.get("name") == value:
            continue  # the part that is already chosen, with its settings
        node[keys[-1]] = value
        data.overrides.append((keys, text.strip()))
    return data


def from_dict(data: dict, source: str = "<config>", schema: type = Config) -> Any:
    """``data`` validated into a ``schema`` (:class:`Config`, or :class:`ClassifierConfig`); messages name
    ``source`` and the key path (or the ``--set`` override that gave the key, for data from
    :func:`apply_overrides`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    given = data.overrides if isinstance(data, _Overridden) else []
    origin = Origin(str(source), given) if given else source
    if schema is Config:
        data = migrate_legacy(data, str(source))
    cfg = _build_dataclass(schema, data, "", origin)
    if given:
        cfg._origin = origin  # for bind_parts, which checks the parts' own keys later
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, registries=None,
                schema: type = Config) -> Any:
    """The config file's merged ``base:`` chain with ``--set`` overrides, validated against ``schema``; with
    ``registries``, a detector config's part sections are also checked against their parts' settings
    (:func:`bind_parts`)."""
    data = apply_overrides(load_yaml(path), overrides or [], schema)
    cfg = from_dict(data, source=os.fspath(path), schema=schema)
    return bind_parts(cfg, registries, os.fspath(path)) if registries is not None and schema is Config else cfg


def to_dict(cfg: Any) -> Any:
    """Plain data (what a file or a checkpoint holds); a part section is ``{name: ..., <settings>}``."""
    if isinstance(cfg, PartConfig):
        settings = dataclasses.asdict(cfg.settings) if cfg.bound else cfg.settings
        return {"name": cfg.name, **copy.deepcopy(settings)}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return copy.deepcopy(cfg)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------- keys of earlier layouts


class ConfigDeprecationWarning(FutureWarning):
    """A config key of an earlier layout: it still loads; the message names the key that replaces it."""


#: legacy model sections that were one part's settings: section -> (part key, part name, nested key or None)
_LEGACY_PART_SECTIONS = {
    "rpn": ("proposal_generator", {"rpn": None}),
    "anchors": ("proposal_generator", {"rpn": "anchors"}),
    "selective_search": ("proposal_generator", {"selective_search": None, "precomputed": None}),
    "svm": ("box_predictor", {"svm": None}),
}
_PRECOMPUTED_KEYS = ("top_k",)


def migrate_legacy(data: dict, source: str) -> dict:
    """Config data written for the layout before parts owned their settings, in today's layout (a warning
    names each moved key): ``model.roi_head`` is ``model.box_predictor`` (``name``, ``dropout``) and
    ``model.roi_heads`` (the rest); ``model.rpn`` and ``model.anchors`` are settings of the ``rpn``
    proposal generator, ``model.selective_search`` of ``selective_search`` (``precomputed`` takes its
    ``top_k``) and ``model.svm`` of the ``svm`` box predictor. A section for a part the config does not
    choose configured nothing and is dropped."""
    model = data.get("model")
    if not isinstance(model, dict) or not any(k in model for k in ("roi_head", *_LEGACY_PART_SECTIONS)):
        return data
    model = copy.deepcopy(model)
    notes = []
    old = model.pop("roi_head", None)
    if isinstance(old, dict):
        moved = {k: old.pop(k) for k in ("name", "dropout") if k in old}
        if moved:
            model["box_predictor"] = _deep_merge(_as_part(moved), _as_part(model.get("box_predictor", {})))
            notes.append(f"model.roi_head.{{{','.join(moved)}}} -> model.box_predictor.{{{','.join(moved)}}}")
        if old:
            model["roi_heads"] = _deep_merge(old, model.get("roi_heads") or {})
            notes.append("model.roi_head.* -> model.roi_heads.*")
    elif old is not None:
        model["roi_head"] = old  # not a mapping: the schema reports it
    defaults = {"proposal_generator": "rpn", "box_predictor": "softmax_box"}
    for section, (part_key, takers) in _LEGACY_PART_SECTIONS.items():
        if section not in model:
            continue
        value = model.pop(section)
        part = _as_part(model.get(part_key, defaults[part_key]))
        name = part.get("name", defaults[part_key])
        if name not in takers or not isinstance(value, dict):
            notes.append(f"model.{section} dropped: it configures {' / '.join(map(repr, takers))}, and "
                         f"model.{part_key} is {name!r}")
            continue
        if name == "precomputed":
            value = {k: v for k, v in value.items() if k in _PRECOMPUTED_KEYS}
        nested = takers[name]
        moved = {nested: value} if nested else value
        model[part_key] = _deep_merge(moved, part)  # keys given in the new place win
        notes.append(f"model.{section}.* -> model.{part_key}.{nested + '.' if nested else ''}*")
    for note in notes:
        warnings.warn(f"{source}: deprecated config key: {note}", ConfigDeprecationWarning, stacklevel=3)
    return {**data, "model": model}


#: keys of the earlier layout's sections that several parts shared, with their defaults there: a part that
#: does not take one ignores it (it configured another part), so configs and checkpoints of that layout load
_SHARED_LEGACY_KEYS = {
    "roi_extractor": {"output_size": None, "sampling_ratio": 0, "aligned": False, "levels": [6, 3, 2, 1],
                      "context_padding": 16, "warp_size": None, "warp_batch": 128},
    "box_predictor": {"dropout": 0.0},
}


def _drop_shared_legacy_keys(key: str, part: PartConfig, cls: type, source: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, default in _SHARED_LEGACY_KEYS.get(key, {}).items():
        if name in part.settings and name not in fields:
            value = part.settings.pop(name)
            if value != default:
                warnings.warn(f"{source}: model.{key}.{name}={value!r} ignored: {part.name!r} takes no such key (the "
                              f"earlier layout shared one section between parts)", ConfigDeprecationWarning,
                              stacklevel=4)


def _as_part(value: Any) -> dict:
    return {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else {}


def check_kwargs(builder: Any, kwargs: dict, path: str, source: str = "config") -> None:
    """Fail with the key path when ``kwargs`` has a key ``builder`` does not accept, or lacks a required one."""
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"{source}: unknown key {path + '.' + key!r}{_closest(key, valid, path)}")
    for n, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs:
            raise ConfigError(f"{source}: missing key {path + '.' + n!r}")
