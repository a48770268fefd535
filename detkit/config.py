"""Configuration: YAML files validated into typed dataclasses.

A config file is plain data. It may name a ``base:`` file (a path relative to
itself) whose contents it is merged over: mappings merge key by key, anything
else replaces (and so does a mapping whose ``name`` names another component). The merged data is validated against :class:`Config`: an unknown
key fails with its full path and the closest valid key, a wrong type names the
expected type. ``--set a.b=value`` overrides are parsed as YAML scalars and typed
by the schema. Defaults are the settings of the Faster R-CNN paper (Ren et al.,
2015, Sec. 3.1.3 and 3.3) and Fast R-CNN (Girshick, 2015, Sec. 2.3).

Parts are chosen by registered name (``model.backbone.name: resnet50``); the
datasets' own keys (``data.train``) are checked against the registered
builder's signature when the dataset is built.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """Invalid configuration: the message names the file and key path."""


# ----------------------------------------------------------------------------- schema


@dataclass
class BackboneConfig:
    name: str = "tiny"
    weights: str | None = None  # local torchvision-format state dict; nothing is downloaded
    freeze_at: int = 0  # freeze the first k trunk stages; -1: the whole trunk (SPP-net fine-tunes fc only)
    frozen_bn: bool | None = None  # None: frozen when `weights` is given, trainable otherwise
    args: dict = field(default_factory=dict)  # extra keyword arguments of the variant's builder


@dataclass
class AnchorConfig:
    sizes: list[float] = field(default_factory=lambda: [128.0, 256.0, 512.0])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclass
class RPNConfig:
    conv_channels: int | None = None  # None: the trunk's channels (512 for VGG-16, as in the paper)
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 12000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.7
    min_size: float = 16.0  # in original-image pixels
    straddle_thresh: float = 0.0  # anchors crossing the border by more are ignored in training; <0 keeps all
    box_loss_weight: float = 1.0
    smooth_l1_beta: float = 1.0 / 9.0


@dataclass
class SelectiveSearchConfig:
    """Selective search proposals (Uijlings et al. 2013), as R-CNN / SPP-net / Fast R-CNN use them."""

    mode: str = "fast"  # fast | quality | rcnn (the R-CNN paper's fast-mode settings)
    max_side: int | None = 500  # the search runs on the image shrunk to this longer side; None: full size
    min_size: float = 0.0  # drop proposals narrower or shorter than this (original-image pixels)
    top_k: int = 2000  # R-CNN: ~2000 proposals per image
    cache_dir: str = "work_dirs/proposals"  # one sub-directory per dataset and settings
    num_workers: int | None = None  # processes computing the cache; None: all cores


@dataclass
class RoIExtractorConfig:
    name: str = "roi_pool"
    output_size: int | None = None  # None: the backbone's (7 for VGG-16)
    sampling_ratio: int = 0  # RoIAlign only
    aligned: bool = False  # RoIAlign only
    levels: list[int] = field(default_factory=lambda: [6, 3, 2, 1])  # SPP pyramid (SPP-net Sec. 3.1)
    context_padding: int = 16  # warp: pixels of context around the box at the warped size (R-CNN App. A)
    warp_size: int | None = None  # warp: side of the warped window; None: the backbone's input size
    warp_batch: int = 128  # warp: windows through the CNN at a time (bounds memory)


@dataclass
class RoIHeadConfig:
    name: str = "softmax_box"
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh_hi: float = 0.5
    bg_iou_thresh_lo: float = 0.1
    add_gt_as_proposals: bool = True
    box_coder_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    box_loss_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    detections_per_img: int = 100
    dropout: float = 0.0  # dropout on the head's input vectors


@dataclass
class SVMConfig:
    """The R-CNN post-hoc classifiers (Sec. 2.3, Appendix B) and box regressor (Appendix C)."""

    C: float = 0.001  # liblinear's C, as in R-CNN
    positive_weight: float = 2.0
    bias_multiplier: float = 10.0
    neg_iou: float = 0.3  # negatives: IoU < 0.3 with every ground truth of the class
    hard_thresh: float = -1.0001  # negatives scoring above this are hard
    evict_thresh: float = -1.2  # cached negatives scoring below this are dropped after a retrain
    retrain_limit: int = 2000  # retrain a class's SVM once this many new hard negatives were mined
    rounds: int = 1  # passes of hard-negative mining over the training set
    max_iter: int = 10000  # liblinear iterations per fit
    tol: float = 0.1  # liblinear's default stopping tolerance for the dual solver, as R-CNN ran it
    cache_dtype: str = "float32"  # float16 halves the feature cache (R-CNN's VOC cache is hundreds of GB)
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this
    ridge_lambda: float = 1000.0
    ridge_min_iou: float = 0.6  # box regression learns from proposals with IoU > 0.6


@dataclass
class TransformConfig:
    min_size: int | list[int] = 600  # a list: drawn per image in training (multi-scale)
    max_size: int = 1000
    mean: list[float] | None = None  # None: the backbone's
    std: list[float] | None = None
    size_divisible: int | None = None  # None: the backbone's stride
    # Multi-scale testing (SPP-net Sec. 3.2, Fast R-CNN Sec. 5.2): features at each shorter side; every
    # region is pooled from the scale at which its area is closest to 224 x 224. None: min_size only.
    test_scales: list[int] | None = None


@dataclass
class ModelConfig:
    detector: str = "faster_rcnn"
    proposal_generator: str = "rpn"  # rpn | selective_search | any registered proposal source
    num_classes: int | None = None  # object classes without background; None: from the training set
    class_names: list[str] | None = None  # filled from the training set when training
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_extractor: RoIExtractorConfig = field(default_factory=RoIExtractorConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    selective_search: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability of a horizontal flip (Faster R-CNN paper: flipped images)
    scale: list[float] | None = None  # [lo, hi]: zoom the content by a factor drawn from it (image size kept)
    crop: float = 0.0  # probability of a random crop that keeps every box whole
    color_jitter: float = 0.0  # probability of brightness/contrast/saturation/hue jitter


@dataclass
class DataConfig:
    # A dataset is `{name: <registered dataset>, ...its builder's keyword arguments}`.
    train: dict | None = None
    test: dict | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 1  # images per iteration (Faster R-CNN end-to-end: 1)
    num_workers: int = 2
    skip_empty: bool = True  # training skips images with no objects
    group_by_aspect_ratio: bool = False  # batches of only landscape or only portrait images


@dataclass
class TrainConfig:
    work_dir: str = "work_dirs/run"
    max_iters: int = 80000
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [60000])
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    checkpoint_period: int = 5000
    log_period: int = 20
    eval_at_end: bool = True
    seed: int = 0
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
    four_step_iters: list[int] = field(default_factory=lambda: [80000, 40000, 80000, 40000])


@dataclass
class EvalConfig:
    metric: str = "coco"  # coco | voc07 (11-point) | voc (VOC2010+ area under the curve)
    backend: str = "faster_coco_eval"  # or pycocotools (COCO metric)
    score_thresh: float | None = None  # None: model.roi_head.score_thresh


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and return it converted (int -> float, ...)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{source}: {path}: expected {_type_name(tp)}, got {value!r}")
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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{source}: {path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _closest(key: str, valid: list[str], parent: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    prefix = f"{parent}." if parent else ""
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _build_dataclass(cls: type, data: dict, path: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {full!r}{_closest(str(key), names, path)}")
        kwargs[key] = _convert(value, hints[key], full, source)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
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


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        tp = _field_type(Config, keys)
        # "--set train.lr=1" must give a float and "--set model.class_names=a" stays a string list error;
        # a YAML-parsed number for a str field is taken back as its text.
        if tp is str and value is not None and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def from_dict(data: dict, source: str = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    return _build_dataclass(Config, data, "", source)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(data, source=os.fspath(path))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


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
