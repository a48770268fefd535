"""Typed build contexts: what a part's builder is told about where it sits in the model.

A registered builder is called as ``builder(settings, context)``: ``settings`` is the instance of the
settings dataclass it was registered with (its config section's keys, defaults filled in), ``context`` one of
the classes below, whose fields are documented here and checked against their annotations when the context
is made (Detectron2's ``ShapeSpec`` + ``from_config``), so a builder written from this page gets exactly
what it reads. A context is frozen: a builder that needs something else asks for it in its settings.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Union

from torch import nn


class BuildContext:
    """Base of the contexts: its fields are checked against their annotations when it is made."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self), globalns=_NAMESPACE)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise TypeError(f"{type(self).__name__}.{f.name}: expected {_describe(hints[f.name])}, got "
                                f"{value!r} ({type(value).__name__})")

    def fields(self) -> dict[str, Any]:
        """The fields by name, unconverted (for a builder written for keyword arguments)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits annotation ``tp`` (unions, tuples and lists element by element; ``Any``,
    ``Callable`` and unknown generics are taken as they are)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, origin):
            return False
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return all(_matches(v, inner) for v in value)
    if origin is not None:
        return isinstance(value, origin) if isinstance(origin, type) and origin is not Callable else True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


@dataclass(frozen=True)
class NeckContext(BuildContext):
    """A neck (FPN) is built on the backbone's feature stages.

    stages: the backbone's :class:`detkit.backbones.FeatureStages` (each stage's :class:`FeatureInfo`:
        channels and stride).
    backbone: the backbone as messages name it (``"backbone 'resnet50'"``), for a refusal that says which.
    """

    stages: Any
    backbone: str


@dataclass(frozen=True)
class ProposalGeneratorContext(BuildContext):
    """A proposal generator sees the maps the body produces.

    in_channels: the maps' depth (one width for every level); None for a source registered
        ``per_dataset=True`` built without a model (``detkit proposals``).
    strides: one per map, finest first (one without a neck); None as for ``in_channels``.
    """

    in_channels: int | None
    strides: list[int] | None


@dataclass(frozen=True)
class RoIExtractorContext(BuildContext):
    """An RoI extractor pools regions from the maps (or, consuming ``"image"``, cuts them from the images).

    output_size: the pooled grid side the backbone's RoI head expects (its ``roi_output_size``).
    strides: of the maps to pool from (one without a neck; the neck's ``roi_levels`` finest with one).
    trunk: the backbone's convolutional trunk (R-CNN's warp runs it on each window).
    input_size: the backbone's classifier input side (R-CNN warps windows to it).
    """

    output_size: int
    strides: list[int]
    trunk: nn.Module
    input_size: int


@dataclass(frozen=True)
class BoxHeadContext(BuildContext):
    """A box head maps one pooled region to a vector.

    pooled_shape: one region as the extractor gives it: ``(C, S, S)``, or ``(D,)`` for a flat vector (SPP).
    backbone_head: the backbone's own RoI head (VGG fc6/fc7, ResNet res5), for a head that reuses it.
    head_in_channels: the channels ``backbone_head`` takes.
    head_channels: the length of ``backbone_head``'s output vector.
    """

    pooled_shape: tuple[int, ...]
    backbone_head: nn.Module
    head_in_channels: int
    head_channels: int


@dataclass(frozen=True)
class BoxPredictorContext(BuildContext):
    """A box predictor classifies and regresses the box head's vectors.

    in_features: the box head's vector length.
    num_classes: object classes, without the background.
    pooled_features: the flattened length of one pooled region (R-CNN's SVMs read pool5 too).
    box_coder_weights: ``(wx, wy, ww, wh)`` the box deltas are scaled by.
    """

    in_features: int
    num_classes: int
    pooled_features: int
    box_coder_weights: tuple[float, ...]


@dataclass(frozen=True)
class DetectorContext(BuildContext):
    """A detector assembles the parts its slots hold.

    model: the bound :class:`detkit.config.ModelConfig` (``model.backbone``, ``model.transform`` and the
        sections of the slots the detector declared, under their keys: ``model.slots["roi_extractor"]``).
    num_classes: object classes, without the background.
    class_names: their names, when known.
    registries: the plugin registries (:class:`detkit.plugins.Registries`), to build parts with.
    build: ``build(slot_key, context) -> part``: the part a slot of the model chooses, built from its bound
        settings with ``context`` (the context class of the slot's kind); None for an optional slot left empty.
    """

    model: Any
    num_classes: int
    class_names: list[str] | None
    registries: Any
    build: Callable[[str, BuildContext], Any]


@dataclass(frozen=True)
class ScheduleContext(BuildContext):
    """A training schedule trains the configured detector.

    config: the bound :class:`detkit.config.Config` (read it; a stage makes its own copy to change).
    registries: the plugin registries.
    resume: a checkpoint path, True (the work dir's latest) or None.
    progress: show progress bars.
    """

    config: Any
    registries: Any
    resume: str | bool | None
    progress: bool


@dataclass(frozen=True)
class LoggerContext(BuildContext):
    """A logger records a training run's numbers (``train.loggers``); only the main process builds one.

    work_dir: the run's ``train.work_dir`` (a logger writes its files there, or below it).
    start_iter: the iteration the run starts from (0, or the one it resumed from): what the logger holds
        beyond it was written after that checkpoint and is dropped.
    max_iters: the run's ``train.max_iters``.
    """

    work_dir: str
    start_iter: int
    max_iters: int


_NAMESPACE = {**globals(), "nn": nn}
