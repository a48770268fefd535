"""The config schema: typed dataclasses of a detector config (:class:`Config`) and a pretraining config
(:class:`ClassifierConfig`), with the papers' settings as defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from detkit.config.core import PartConfig, ranged


# ----------------------------------------------------------------------------- schema

#: the config layout this release writes; :func:`upgrade` brings a file of an earlier one up to it, one
#: version at a time (1: before parts owned their settings; 2: ``model.detector`` a name and
#: ``train.four_step_iters``; 3: the detector and the schedule are part sections with settings of their own)
CONFIG_VERSION = 3


@dataclass
class BackboneConfig:
    name: str = "tiny"
    weights: str | None = None  # local torchvision-format state dict; nothing is downloaded
    # freeze the first k trunk stages; -1: the whole trunk (SPP-net fine-tunes fc only)
    freeze_at: int = ranged(0, ge=-1)
    frozen_bn: bool | None = None  # None: frozen when `weights` is given, trainable otherwise
    args: dict = field(default_factory=dict)  # extra keyword arguments of the variant's builder
    # the layout `weights` were trained in, for a file that records none (detkit's files record it; one without
    # a record is taken for torchvision's): e.g. {stride_in_1x1: true} for a ResNet trained in the paper's layout
    weights_layout: dict | None = None


@dataclass
class TransformConfig:
    # a list: drawn per image in training (multi-scale); 0: the image's own size (R-CNN warps from it)
    min_size: int | list[int] = ranged(600, ge=0, nonempty=True)
    max_size: int = ranged(1000, ge=1)
    mean: list[float] | None = None  # None: the backbone's
    std: list[float] | None = ranged(None, gt=0)
    size_divisible: int | None = ranged(None, ge=1)  # None: the backbone's stride
    # Multi-scale testing (SPP-net Sec. 3.2, Fast R-CNN Sec. 5.2): features at each shorter side; every
    # region is pooled from the scale at which its area is closest to 224 x 224. None: min_size only.
    test_scales: list[int] | None = ranged(None, ge=1)


@dataclass
class ModelConfig:
    """The model: the detector ``model.detector`` names (a part section ``{name: ..., <its settings>}``), the
    backbone, the input transform, and the sections of the slots that detector declares
    (:class:`detkit.registry.kinds.Slot`): ``model.<slot key>`` is a part section (``model.roi_extractor:
    {name: roi_align, sampling_ratio: 2}``) or a settings section of the detector's (``model.roi_heads``).
    The slot sections are kept in ``slots`` (no key of its own in a file; ``model.roi_extractor`` reads
    ``slots["roi_extractor"]``). Until the config is bound (:func:`bind_parts`) they are the given data; after,
    each slot the detector declares holds a bound :class:`PartConfig` (None: an optional part left out) or
    its settings dataclass, defaults filled in."""

    detector: PartConfig = field(default_factory=lambda: PartConfig("faster_rcnn"))
    num_classes: int | None = ranged(None, ge=1)  # object classes without background; None: from the training set
    class_names: list[str] | None = None  # filled from the training set when training
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    slots: dict = field(default_factory=dict, metadata={"open": True})
    transform: TransformConfig = field(default_factory=TransformConfig)

    def __getattr__(self, key: str) -> Any:
        slots = self.__dict__.get("slots")
        if slots is not None and key in slots:
            return slots[key]
        raise AttributeError(f"model.{key}: no such key"
                             + (f" (the detector's slots: {', '.join(slots)})" if slots else " (the config is not bound "
                                "to its detector yet: detkit.config.bind_parts)"))

    def __setattr__(self, key: str, value: Any) -> None:
        if key in _MODEL_FIELDS or key.startswith("_"):
            object.__setattr__(self, key, value)
        else:
            self.slots[key] = value


_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


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
    val: dict | None = None  # what train.eval_period validates on (None: data.test)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = ranged(1, ge=1)  # images per iteration (Faster R-CNN end-to-end: 1)
    num_workers: int = ranged(2, ge=0)
    skip_empty: bool = True  # training skips images with no objects
    group_by_aspect_ratio: bool = False  # batches of only landscape or only portrait images


@dataclass
class TrainerConfig:
    """The trainer's settings, shared by detection (:class:`TrainConfig`) and classification pretraining."""

    work_dir: str = "work_dirs/run"
    max_iters: int = ranged(80000, ge=1)
    lr: float = ranged(0.001, gt=0)
    momentum: float = ranged(0.9, ge=0, le=1)
    weight_decay: float = ranged(0.0005, ge=0)
    warmup_iters: int = ranged(0, ge=0)
    warmup_factor: float = ranged(0.001, ge=0, le=1)
    # step: x gamma at each of `steps` (the detection papers'); cosine: half a cosine from lr to 0 over max_iters
    # (Loshchilov & Hutter 2017), after the warmup
    lr_policy: str = "step"
    steps: list[int] = ranged(default_factory=lambda: [60000], ge=0)
    gamma: float = ranged(0.1, gt=0)
    clip_grad_norm: float | None = ranged(None, gt=0)
    checkpoint_period: int = ranged(5000, ge=0)  # 0: no periodic checkpoints (final.pth only)
    # the newest this many periodic checkpoints (iter_*.pth) are kept, older ones removed as new ones are written;
    # final.pth and best.pth always stay. 0: every one is kept
    keep_checkpoints: int = ranged(0, ge=0)
    log_period: int = ranged(20, ge=1)
    eval_at_end: bool = True
    seed: int = ranged(0, ge=0, lt=2**63)  # torch and numpy take 64-bit seeds
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16 with a gradient scaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the trunk
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA) when trainable BN is used
    # Linear scaling rule (Goyal et al. 2017): lr and warmup are given for one process;
    # with N processes the global batch is N times larger and lr is multiplied by N.
    scale_lr: bool = True
    # Training images that cannot be decoded are skipped (named in the log, counted at the end) up to this
    # many; one more stops training. Missing or empty files stop it before the first iteration.
    max_bad_images: int = ranged(10, ge=0)
    # where the numbers go (detkit list loggers): jsonl (log.jsonl, always kept), csv (log.csv), tensorboard
    # (tensorboard/ event files), or a plugin's; each `{name: ..., <its settings>}`
    loggers: list[PartConfig] = field(default_factory=lambda: [PartConfig("jsonl")])


@dataclass
class TrainConfig(TrainerConfig):
    """A detector's training: the trainer's settings and the schedule, a registered part with settings of its
    own (``train.schedule: {name: four_step, iters: [...]}``; ``detkit list schedules``). The default
    ``end_to_end`` gives way to the schedule a chosen part declares (an SVM predictor's ``svm_posthoc``)."""

    schedule: PartConfig = field(default_factory=lambda: PartConfig("end_to_end"))
    # validation every this many iterations on data.val (else data.test), as detkit eval scores it; its metrics
    # go to log.jsonl (val/AP ...) and the weights of the best so far to best.pth. 0: only the end-of-run one
    eval_period: int = ranged(0, ge=0)
    # the metric best.pth is chosen by, higher is better: a key of metrics.json (AP, AP50, APs...; mAP for VOC)
    best_metric: str = "AP"


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
    # the most detections of an image that count (COCO's maxDets) and that the detector returns (its RoI heads'
    # detections_per_img while it is evaluated): a scene with more objects than this needs more
    max_detections: int = ranged(100, ge=10)
    tile: TileSettings = field(default_factory=TileSettings)  # size > 0: tiled inference (detkit.tiling)


@dataclass
class Config:
    version: int = ranged(CONFIG_VERSION, ge=1)  # the layout the file was written in (older ones are upgraded)
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
    # the layout `weights` were trained in, for a file that records none (detkit's files record it; one without
    # a record is taken for torchvision's): e.g. {stride_in_1x1: true} for a ResNet trained in the paper's layout
    weights_layout: dict | None = None


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
    # validation top-1/top-5 every this many iterations (0: at the end only); the best top-1 so far: best.pth
    period: int = ranged(0, ge=0)
    ten_crop: bool = False  # 10-crop testing (AlexNet Sec. 4.1, GoogLeNet Sec. 7) at the end of training


@dataclass
class ClassifierConfig:
    """``detkit pretrain``: a backbone trained as a classifier, with the trainer's settings."""

    version: int = ranged(CONFIG_VERSION, ge=1)
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)
