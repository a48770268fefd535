"""detkit's Python API: run a trained detector in three lines, and train, evaluate, configure and list parts
from Python exactly as the command line does (the CLI's ``train``, ``eval``, ``config show`` and ``list``
commands call these functions).

    from detkit import Detector
    detector = Detector.from_checkpoint("work_dirs/demo/final.pth")
    detections = detector("image.jpg")
    print(detections.boxes, detections.scores, detections.class_names)

:class:`Detector` takes what a user has at hand: a path, a folder, an ``(H, W, 3)`` uint8 RGB array, a PIL
image, a ``(3, H, W)`` tensor (uint8, or float in [0, 1]) or a list of them, and gives :class:`Detections`
(boxes xyxy in the input's pixels, scores, labels 1..K and class names) per image. An exported file (ONNX,
TorchScript, ``torch.export``) runs through the same interface (:meth:`Detector.from_export`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from detkit.config import Config, ConfigError, TileSettings

#: What :class:`Detector` takes as one image.
ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, Any]

log = logging.getLogger(__name__)

__all__ = ["Detections", "Detector", "PartInfo", "evaluate", "list_parts", "load_config", "train"]


# ----------------------------------------------------------------------------- detections


@dataclasses.dataclass(frozen=True)
class Detections:
    """The detections of one image, most confident first.

    Attributes:
        boxes: ``(N, 4)`` float32 tensor, xyxy in the input image's pixels.
        scores: ``(N,)`` float32 tensor.
        labels: ``(N,)`` int64 tensor, 1..K (0 is background and never a detection).
        names: the model's K class names (label ``i`` is ``names[i - 1]``).
        cat_ids: the dataset category id of each label (``cat_ids[i - 1]``), for COCO results.
        image_size: ``(height, width)`` of the image.
        source: the file the image came from, or None.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...]
    cat_ids: tuple[int, ...]
    image_size: tuple[int, int]
    source: str | None = None

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def class_names(self) -> list[str]:
        """The class name of each detection."""
        return [self.names[int(label) - 1] for label in self.labels.tolist()]

    def above(self, score: float) -> Detections:
        """The detections scoring at least ``score``."""
        keep = self.scores >= score
        return dataclasses.replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep])

    def to_numpy(self) -> dict[str, Any]:
        """``{"boxes": (N, 4) float32, "scores": (N,) float32, "labels": (N,) int64, "class_names": [str]}``."""
        return {"boxes": self.boxes.numpy(), "scores": self.scores.numpy(), "labels": self.labels.numpy(),
                "class_names": self.class_names}

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of the detections,
        as ``detkit eval --results`` and pycocotools read them."""
        from detkit.evaluation import detections_to_coco_results

        return detections_to_coco_results(image_id, {"boxes": self.boxes, "scores": self.scores,
                                                     "labels": self.labels}, list(self.cat_ids))

    def draw(self, image: ImageLike | None = None, score: float = 0.0) -> np.ndarray:
        """``image`` (default: the file the detections came from) as an ``(H, W, 3)`` uint8 RGB array with each
        detection scoring at least ``score`` drawn: its box, class name and score."""
        from detkit.evaluation.drawing import draw_detections

        if image is None:
            if self.source is None:
                raise ValueError("Detections.draw: give the image (these detections were not made from a file)")
            image = self.source
        array = _as_rgb_array(image, "image")
        if tuple(array.shape[:2]) != tuple(self.image_size):
            raise ValueError(f"Detections.draw: the image is {array.shape[0]}x{array.shape[1]}, the detections "
                             f"were made on {self.image_size[0]}x{self.image_size[1]}")
        return draw_detections(array, self.boxes.numpy(), self.scores.numpy(), self.labels.numpy(), list(self.names),
                               score_thr=score)

    def __repr__(self) -> str:
        kinds = {}
        for name in self.class_names:
            kinds[name] = kinds.get(name, 0) + 1
        found = ", ".join(f"{n} {name}" for name, n in kinds.items()) or "nothing"
        where = f" in {self.source}" if self.source else ""
        return f"Detections({len(self)}: {found}{where}, image {self.image_size[0]}x{self.image_size[1]})"


# ----------------------------------------------------------------------------- images


def _as_rgb_array(image: ImageLike, what: str) -> np.ndarray:
    """Any accepted image as ``(H, W, 3)`` uint8 RGB on the host."""
    from detkit.data.images import read_image, to_hwc_uint8

    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{what}: a tensor image is (3, H, W), got shape {tuple(image.shape)}")
        if image.is_floating_point() and image.numel() and not bool(((image >= 0) & (image <= 1)).all()):
            raise ValueError(f"{what}: a float tensor image holds values in [0, 1]")
        return to_hwc_uint8(image)
    if type(image).__module__.startswith("PIL."):
        image = np.array(image.convert("RGB"))  # a copy: PIL's buffer is read-only
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{what}: an array image is (H, W, 3) uint8 RGB, got shape {image.shape} {image.dtype}")
        if not image.shape[0] or not image.shape[1]:
            raise ValueError(f"{what}: the image is empty ({image.shape[0]}x{image.shape[1]})")
        return image
    raise TypeError(f"{what}: expected a path, a folder, an (H, W, 3) uint8 array, a PIL image or a (3, H, W) "
                    f"tensor, got {type(image).__name__}")


def _expand(inputs: ImageLike | Sequence[ImageLike]) -> tuple[list[tuple[Any, str | None]], bool]:
    """``(image or path, source)`` pairs of the inputs, and whether one image was given (not a list or folder)."""
    from detkit.data.media import list_images

    if isinstance(inputs, (list, tuple)):
        items = [pair for item in inputs for pair in _expand(item)[0]]
        return items, False
    if isinstance(inputs, (str, os.PathLike)):
        if os.path.isdir(inputs):
            return [(str(p), str(p)) for p in list_images(inputs)], False  # MediaError: no images there
        return [(os.fspath(inputs), os.fspath(inputs))], True
    return [(inputs, None)], True


# ----------------------------------------------------------------------------- the detector


class Detector:
    """A trained detector, called on images: ``detector(image) -> Detections``, ``detector([a, b]) ->
    [Detections, Detections]``, ``detector(folder) -> [Detections per image, sorted by name]``.

    Made by :meth:`from_checkpoint` (the eager model a ``detkit train`` checkpoint describes) or
    :meth:`from_export` (a file ``detkit export`` wrote). Images are read with :func:`detkit.data.images.read_image`
    (the decoded-pixel limit applies; :attr:`tile` cuts larger ones into windows).

    Attributes:
        model: the underlying detector (an ``nn.Module`` in eval mode, or an exported file's runner).
        class_names: the K class names.
        cat_ids: the training set's category id of each class.
        device: where the model runs.
        score_thresh: detections scoring below it are dropped.
        batch_size: images per forward pass (consecutive images; an exported file batches images of one size).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``: autocast around the forward pass.
        config: the checkpoint's resolved :class:`~detkit.config.Config` (None for an exported file).
    """

    def __init__(self, model, class_names: Sequence[str], cat_ids: Sequence[int] | None = None,
                 device: str | torch.device = "cpu", score_thresh: float = 0.0, batch_size: int = 1,
                 amp: str = "none", config: Config | None = None):
        self.model = model
        self.class_names = list(class_names)
        self.cat_ids = list(cat_ids) if cat_ids else list(range(1, len(self.class_names) + 1))
        self.device = torch.device(device)
        self.score_thresh = _check_score(score_thresh)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        if amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp={amp!r}: expected none, bf16 or fp16")
        self.amp = amp
        self.config = config

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        score_thresh: float | None = None, tile: int | Mapping | TileSettings | None = None,
                        batch_size: int = 1, amp: str = "none", max_detections: int | None = None,
                        overrides: Mapping[str, Any] | Sequence[str] | None = None, registries=None) -> Detector:
        """The detector a ``detkit train`` checkpoint holds (its embedded config rebuilds the model).

        Args:
            path: a checkpoint (``final.pth``, ``iter_*.pth``).
            device: ``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
            score_thresh: keep detections scoring at least this; None: the model's own
                ``roi_heads.score_thresh`` (0.05 by default). A lower value also lowers the model's.
            tile: tiled inference for images far larger than the model's input: a window size in pixels, or
                the ``eval.tile`` settings as a mapping (``{"size": 512, "overlap": 0.2}``); None: the
                checkpoint's ``eval.tile`` (off unless it was trained with it).
            batch_size: images per forward pass.
            amp: ``"bf16"`` or ``"fp16"`` run the forward pass under autocast.
            max_detections: the most detections per image (the RoI heads' ``detections_per_img``).
            overrides: changes to the embedded config, ``{"model.roi_heads.nms_thresh": 0.4}`` or
                ``["model.roi_heads.nms_thresh=0.4"]`` (what ``--set`` takes).
            registries: the plugin registries (default: :func:`detkit.plugins.get_registries`).
        """
        from detkit.engine.devices import resolve_device
        from detkit.models.loading import model_from_checkpoint
        from detkit.models.roi_heads import set_roi_heads
        from detkit.models.tiling import tiled
        from detkit.plugins import get_registries

        device = resolve_device(str(device))
        model, cfg, ckpt = model_from_checkpoint(os.fspath(path), registries or get_registries(), device,
                                                 _override_list(overrides))
        changes = {}
        if max_detections is not None:
            changes["detections_per_img"] = int(_check_int(max_detections, "max_detections", 1))
        if score_thresh is not None:
            changes["score_thresh"] = _check_score(score_thresh)
        heads = set_roi_heads(model, **changes)
        if score_thresh is None:
            score_thresh = 0.0  # the model's own threshold has applied
        elif not heads:
            raise ConfigError(f"{path}: this detector ({type(model).__name__}) has no RoI heads whose "
                              f"score_thresh or detections_per_img could be set")
        model = tiled(model, _tile_settings(tile, cfg.eval.tile), progress=False)
        return cls(model, ckpt["class_names"], ckpt.get("cat_ids"), device, score_thresh, batch_size, amp, cfg)

    @classmethod
    def from_export(cls, path: str | os.PathLike, score_thresh: float = 0.0, batch_size: int = 1,
                    tile: int | Mapping | TileSettings | None = None) -> Detector:
        """A file ``detkit export`` wrote (``.onnx``, ``.ts``, ``.pt2``), run on the CPU as it was exported
        (its own score threshold and detections cap; ``score_thresh`` filters further)."""
        from detkit.export.formats import load_exported
        from detkit.models.tiling import tiled

        exported = load_exported(os.fspath(path))
        model = tiled(exported, _tile_settings(tile, TileSettings()), progress=False)
        return cls(model, exported.class_names, exported.cat_ids, "cpu", score_thresh, batch_size)

    def __call__(self, inputs: ImageLike | Sequence[ImageLike]) -> Detections | list[Detections]:
        """Detections of one image (a path, an array, a PIL image, a tensor), or of each image of a list or a
        folder (a list, in order; a folder's images sorted by name)."""
        items, single = _expand(inputs)
        found = [d for start in range(0, len(items), self.batch_size)
                 for d in self._detect(items[start:start + self.batch_size], start)]
        return found[0] if single else found

    @torch.no_grad()
    def _detect(self, items: list[tuple[Any, str | None]], first: int) -> list[Detections]:
        from detkit.data.images import to_chw_tensor
        from detkit.engine.devices import autocast

        arrays = [_as_rgb_array(image, source or f"image {first + i}") for i, (image, source) in enumerate(items)]
        if hasattr(self.model, "eval"):
            self.model.eval()
        with autocast(self.device, self.amp):
            outputs = self.model([to_chw_tensor(a, self.device) for a in arrays])
        found = []
        for array, (_, source), out in zip(arrays, items, outputs):
            scores = out["scores"].detach().float().cpu()
            order = torch.argsort(scores, descending=True, stable=True)
            keep = order[scores[order] >= self.score_thresh]
            found.append(Detections(out["boxes"].detach().float().cpu()[keep], scores[keep],
                                    out["labels"].detach().long().cpu()[keep], tuple(self.class_names),
                                    tuple(self.cat_ids), (int(array.shape[0]), int(array.shape[1])), source))
        return found

    def __repr__(self) -> str:
        more = " ..." if len(self.class_names) > 5 else ""
        return f"Detector({len(self.class_names)} classes {self.class_names[:5]}{more}, " \
               f"device {self.device}, score_thresh {self.score_thresh:g})"


def _check_score(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ConfigError(f"score_thresh={value!r}: expected a finite number")
    return float(value)


def _check_int(value: Any, name: str, ge: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < ge:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {ge}")
    return int(value)


def _override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"a.b": 1}`` or ``["a.b=1"]`` as ``--set``'s ``KEY=VALUE`` strings (values as YAML)."""
    import yaml

    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r}: expected a mapping of keys to values or a list of KEY=VALUE")
    return [str(o) for o in overrides]


def _tile_settings(tile: int | Mapping | TileSettings | None, base: TileSettings) -> TileSettings:
    from detkit.models.tiling import settings_with_options

    if tile is None:
        return settings_with_options(base, {})
    if isinstance(tile, TileSettings):
        return settings_with_options(tile, {})
    if isinstance(tile, Mapping):
        unknown = sorted(set(tile) - {f.name for f in dataclasses.fields(TileSettings)})
        if unknown:
            raise ConfigError(f"tile: unknown key {unknown[0]!r} (keys: "
                              f"{', '.join(f.name for f in dataclasses.fields(TileSettings))})")
        return settings_with_options(base, dict(tile))
    return settings_with_options(base, {"size": _check_int(tile, "tile", 0)})


# ----------------------------------------------------------------------------- configs, training, evaluation


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                registries=None) -> Config:
    """The detection config at ``path`` with ``overrides`` applied (``{"train.max_iters": 100}`` or
    ``["train.max_iters=100"]``), validated and bound to the registered parts (every part's settings filled in,
    as ``detkit config show`` prints them). Raises ConfigError naming the key and the file."""
    from detkit.config import load_config as _load
    from detkit.plugins import get_registries

    return _load(os.fspath(path), _override_list(overrides), registries or get_registries())


def train(config: str | os.PathLike | Config, overrides: Mapping[str, Any] | Sequence[str] | None = None,
          resume: bool | str | os.PathLike = False, overwrite: bool = False, progress: bool = True,
          registries=None) -> dict:
    """Train the detector ``config`` describes (a path, or a :class:`~detkit.config.Config` from
    :func:`load_config`), as ``detkit train`` does.

    Args:
        resume: True: continue from the newest checkpoint in ``train.work_dir``; a path: from that checkpoint.
        overwrite: replace a finished run in ``train.work_dir`` (its checkpoints, log and metrics).
        progress: show progress bars.

    Returns:
        ``{"checkpoint": path of final.pth, "metrics": the end-of-training evaluation (or None), "model": the
        trained nn.Module}``.
    """
    from detkit.plugins import get_registries
    from detkit.training import train as _train

    registries = registries or get_registries()
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("train: overrides go with a config path; change a Config object's fields directly")
        cfg = config
    else:
        cfg = load_config(config, overrides, registries)
    if isinstance(resume, (str, os.PathLike)):
        resume = os.fspath(resume)
    return _train(cfg, registries, resume=resume or None, progress=progress, overwrite=overwrite)


def evaluate(checkpoint: str | os.PathLike, data: str | Mapping | None = None, output: str | os.PathLike | None = None,
             device: str = "auto", metric: str | None = None, max_detections: int | None = None,
             overrides: Mapping[str, Any] | Sequence[str] | None = None, progress: bool = True,
             export: str | os.PathLike | None = None, svd: Sequence[int] | None = None, images: str | None = None,
             split: str | None = None, classes: Sequence[str] | None = None, registries=None) -> dict:
    """COCO (or VOC) metrics of a checkpoint on its config's ``data.test`` or on ``data``, as ``detkit eval``
    computes them; writes ``metrics.json``, ``results.json`` and the error report under ``output`` (default:
    ``eval/`` beside the checkpoint).

    Args:
        data: a COCO json, a VOC directory, a YOLO ``data.yaml``, or a dataset mapping (``{"name": "coco",
            "images": ..., "annotations": ...}``); None: the checkpoint's ``data.test``.
        metric: ``"coco"``, ``"voc07"`` or ``"voc"``; None: the config's ``eval.metric``.
        max_detections: detections per image the detector returns and COCO counts (``eval.max_detections``).
        export: run this exported file instead of the checkpoint's eager model (the checkpoint still gives the
            config and the classes).
        svd: ranks of a truncated SVD of the box head's fully connected layers (Fast R-CNN Sec. 3.1), e.g.
            ``[1024, 256]``.
        images, split, classes: with a ``data`` path: the images folder of a COCO json, the split of a VOC or
            YOLO dataset, the class list of a VOC directory (default: the checkpoint's classes).

    Returns:
        the metrics (``AP``, ``AP50``, ..., ``per_class``; VOC: ``mAP``, ``per_class``).
    """
    from detkit.data.loading import build_dataset, dataset_spec
    from detkit.data.media import check_output_dir
    from detkit.engine.devices import resolve_device
    from detkit.evaluation import evaluate as _evaluate
    from detkit.models.loading import model_from_checkpoint
    from detkit.plugins import get_registries

    registries = registries or get_registries()
    changes = _override_list(overrides)
    if metric:
        changes.append(f"eval.metric={metric}")
    if max_detections is not None:
        changes.append(f"eval.max_detections={_check_int(max_detections, 'max_detections', 10)}")
    checkpoint = os.fspath(checkpoint)
    out = os.fspath(output) if output else os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "eval")
    check_output_dir(out, "output")
    device = resolve_device(device)
    model, cfg, ckpt = model_from_checkpoint(checkpoint, registries, device, changes)
    if svd is not None:
        if export:
            raise ConfigError("--svd compresses the eager model's fc layers; an --export file is run as it was written")
        log.info("truncated SVD: %s", "; ".join(compress(model, list(svd))))
    if export:
        model = exported_in_place_of(model, os.fspath(export))
    spec = None
    if data is not None:
        spec = dataset_spec(data, registries.datasets, images, split, list(classes or ckpt["class_names"]))
    dataset = build_dataset(spec or cfg.data.test, registries, "test" if spec is None else "data")
    return _evaluate(model, cfg, registries, device, out, dataset=dataset, progress=progress)


def compress(model, ranks: list[int]) -> list[str]:
    """Truncated SVD of the fully connected layers the detector declares (``svd_layers()``: the box head's
    fc6/fc7), at ``ranks``; returns what was replaced (Fast R-CNN Sec. 3.1)."""
    from detkit.models.svd import compress_fully_connected

    head = model.svd_layers() if callable(getattr(model, "svd_layers", None)) else None
    if head is None:
        raise ConfigError(f"svd: this detector ({type(model).__name__}) declares no fully connected layers to "
                          f"factor (a svd_layers() method)")
    try:
        return compress_fully_connected(head, ranks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def exported_in_place_of(model, path: str):
    """The exported file at ``path`` to run instead of ``model`` (the same classes, or ConfigError)."""
    from detkit.export.formats import load_exported

    exported = load_exported(path)
    if exported.class_names and exported.class_names != list(model.class_names or exported.class_names):
        raise ConfigError(f"--export {path}: its classes {exported.class_names} are not the checkpoint's "
                          f"{model.class_names}")
    return exported


# ----------------------------------------------------------------------------- parts


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """One registered part: its kind (``backbones``, ``necks``, ``detectors``...), name, the plugin that
    registered it, its settings' config keys with their defaults, and what it declared about itself."""

    kind: str
    name: str
    plugin: str
    settings: dict[str, Any]
    info: dict[str, Any]


def list_parts(kind: str | None = None, registries=None) -> list[PartInfo]:
    """The registered parts of ``kind`` (``"backbones"``, ``"backbone"``, ``"detectors"``, any kind a plugin
    declared), or of every kind, as ``detkit list`` prints them."""
    from detkit.plugins import get_registries

    registries = registries or get_registries()
    try:
        kinds = [registries.part_kind(kind).plural] if kind else list(registries.kinds)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]) if exc.args else str(exc)) from None
    parts = []
    for plural in kinds:
        for entry in registries.kind(plural).entries():
            settings = {f.name: _default(f) for f in dataclasses.fields(entry.settings)} if entry.settings else {}
            parts.append(PartInfo(plural, entry.name, entry.plugin, settings, dict(entry.info)))
    return parts


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
