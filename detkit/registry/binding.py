"""Binding a config to the parts it chooses, and calling their builders.

The detector ``model.detector`` names declares its slots (:class:`~detkit.registry.kinds.Slot`); binding
checks every section of the model against them (a key no slot declares is an unknown key, with the closest
one), fills the slots the config leaves out with their defaults, and replaces each part section's keys by the
settings dataclass its part registered, defaults filled in. The schedule ``train.schedule`` names is bound the
same way. Nothing here knows a detector, a slot or a part by name: it all comes from the declarations.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from detkit.config import (Config, ConfigError, ModelConfig, NoSettings, Origin, PartConfig, TrainConfig,
                           build_dataclass, check_kwargs, closest_hint, drop_shared_legacy_keys, origin_of,
                           part_section)
from detkit.registry.contexts import BuildContext, DetectorContext, ScheduleContext
from detkit.registry.kinds import PartKind, Slot
from detkit.registry.records import PluginError, UnknownNameError

_MISSING = object()


def bind_config(cfg: Any, registries, source: str | Origin = "config") -> Any:
    """Bind a :class:`Config` (its model and schedule) or a :class:`ModelConfig` in place; returns it. A config
    that is already bound is left as it is; a part section changed since is bound anew."""
    given = getattr(cfg, "_origin", None)
    if isinstance(given, Origin) and not isinstance(source, Origin):
        source = Origin(str(source), given.overrides)
    if isinstance(cfg, Config):
        bind_model(cfg.model, registries, source)
        bind_schedule(cfg.train, registries, source)
        bind_loggers(cfg.train, registries, source)
    elif isinstance(cfg, ModelConfig):
        bind_model(cfg, registries, source)
    else:
        raise TypeError(f"bind_config: expected a Config or ModelConfig, got {type(cfg).__name__}")
    return cfg


def detector_slots(model: ModelConfig, registries, source: str | Origin = "config") -> tuple[Slot, ...]:
    """The slots the chosen detector declares."""
    return tuple(_entry(registries.part_kind("detector"), model.detector.name, "model.detector", registries, source)
                 .info.get("slots", ()))


def bind_model(model: ModelConfig, registries, source: str | Origin = "config") -> ModelConfig:
    """The detector's own settings and every slot it declares, bound (see the module doc); the backbone's name
    and the keys of ``model.backbone.args`` checked against its builder, as building it would."""
    try:
        backbone = registries.backbones.get(model.backbone.name)
    except UnknownNameError as exc:
        raise ConfigError(f"{origin_of(source, 'model.backbone.name')}: model.backbone.name: {exc}") from None
    check_kwargs(backbone.builder, {"num_classes": 1, **(model.backbone.args or {})}, "model.backbone.args",
                 str(origin_of(source, "model.backbone.args")))
    model.detector = bind_part(registries.part_kind("detector"), model.detector, "model.detector", registries, source)
    slots = detector_slots(model, registries, source)
    declared = {slot.key: slot for slot in slots}
    for key in model.slots:
        if key not in declared:
            valid = [f.name for f in dataclasses.fields(ModelConfig) if not f.metadata.get("open")] + list(declared)
            raise ConfigError(f"{origin_of(source, f'model.{key}')}: unknown key 'model.{key}' for detector "
                              f"{model.detector.name!r}{closest_hint(key, valid, 'model')}")
    object.__setattr__(model, "slots", {slot.key: _bind_slot(slot, model.slots.get(slot.key, _MISSING), registries,
                                                              source) for slot in slots})
    return model


def _bind_slot(slot: Slot, value: Any, registries, source: str | Origin) -> Any:
    path = f"model.{slot.key}"
    if slot.kind is None:  # a settings section of the detector's own
        if value is _MISSING or value is None:
            return slot.settings()
        if isinstance(value, slot.settings):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{origin_of(source, path)}: {path}: expected a mapping, got {value!r}")
        return build_dataclass(slot.settings, value, path, source)
    if value is _MISSING or (value is None and slot.default is None):
        value = slot.default
        if value is None:
            return None  # an optional part left out
    if value is None:
        raise ConfigError(f"{origin_of(source, path)}: {path}: the detector needs this part (default "
                          f"{slot.default!r}); name one")
    part = value if isinstance(value, PartConfig) else part_section(value, slot.default, path, source)
    return bind_part(registries.part_kind(slot.kind), part, path, registries, source)


def bind_schedule(train: TrainConfig, registries, source: str | Origin = "config") -> TrainConfig:
    train.schedule = bind_part(registries.part_kind("schedule"), train.schedule, "train.schedule", registries, source)
    return train


def bind_loggers(train, registries, source: str | Origin = "config"):
    """``train.loggers`` (of a detection or a classification config), each bound to its logger's settings."""
    kind = registries.part_kind("logger")
    train.loggers = [bind_part(kind, part, f"train.loggers[{i}]", registries, source)
                     for i, part in enumerate(train.loggers)]
    return train


def bind_part(kind: PartKind, part: PartConfig, path: str, registries, source: str | Origin = "config"
              ) -> PartConfig:
    """``part``'s settings checked against the dataclass its registered part declares, and replaced by an
    instance of it (a bound part is checked to hold that class)."""
    entry = _entry(kind, part.name, path, registries, source)
    cls = entry.settings or NoSettings
    if part.bound:
        if not isinstance(part.settings, cls):
            raise ConfigError(f"{source}: {path}: holds the settings of another part ({type(part.settings).__name__}), "
                              f"not of {part.name!r}")
        return part
    part = PartConfig(part.name, dict(part.settings))
    drop_shared_legacy_keys(path, part, cls, source)
    if cls is NoSettings and part.settings:
        raise ConfigError(f"{origin_of(source, path)}: {path}: {kind.key.replace('_', ' ')} {part.name!r} takes no "
                          f"settings, got {', '.join(map(repr, part.settings))}")
    part.settings = build_dataclass(cls, part.settings, path, source)
    return part


def _entry(kind: PartKind, name: str, path: str, registries, source: str | Origin):
    try:
        return registries.kind(kind.plural).get(name)
    except KeyError as exc:  # detkit.plugins.UnknownNameError: its message names the part and the candidates
        raise ConfigError(f"{origin_of(source, path + '.name')}: {path}.name: {exc}") from None


# ----------------------------------------------------------------------------- calling builders


def call_builder(kind: PartKind, entry, settings: Any, context: BuildContext) -> Any:
    """``entry.builder(settings, context)``. A builder of an earlier release, written for keyword arguments
    (``builder(settings, in_channels=..., strides=...)``; a detector's ``builder(cfg=..., num_classes=...)``),
    is called that way for one more release, with a deprecation warning naming the plugin."""
    if _takes_context(entry.builder, kind):
        return entry.builder(settings, context)
    _warn_keyword_builder(kind.key, entry.name, entry.plugin, kind.context.__name__)
    if isinstance(context, (DetectorContext, ScheduleContext)):  # these took no settings then
        return entry.builder(**_legacy_fields(context))
    return entry.builder(settings, **_accepted(entry.builder, context.fields()))


def _takes_context(builder, kind: PartKind) -> bool:
    """Whether ``builder`` is written as ``builder(settings, context)``: its second parameter is named
    ``context`` (or ``ctx``) or annotated with the kind's context class."""
    try:
        params = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        return True
    if len(params) < 2:
        return False
    second = params[1]
    annotation = second.annotation if isinstance(second.annotation, str) else getattr(second.annotation, "__name__", "")
    return second.name in ("context", "ctx") or annotation.endswith(kind.context.__name__)


def _accepted(builder, fields: dict) -> dict:
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fields
    return {k: v for k, v in fields.items() if k in params}


def _legacy_fields(context: BuildContext) -> dict:
    if isinstance(context, DetectorContext):
        return {"cfg": context.model, "num_classes": context.num_classes, "registries": context.registries,
                "class_names": context.class_names}
    return {"cfg": context.config, "registries": context.registries, "resume": context.resume,
            "progress": context.progress}


@functools.lru_cache(maxsize=None)
def _warn_keyword_builder(kind: str, name: str, plugin: str, context: str) -> None:
    warnings.warn(f"{kind} {name!r} of plugin {plugin!r}: a builder taking keyword arguments is deprecated; write "
                  f"it as builder(settings, context: {context}) (detkit.registry.contexts)", DeprecationWarning,
                  stacklevel=4)


def slot_builder(model: ModelConfig, registries):
    """``build(slot_key, context)`` for a :class:`DetectorContext`: the part a bound model's slot chooses,
    built with ``context`` (None for an optional slot left empty)."""
    slots = {slot.key: slot for slot in detector_slots(model, registries) if slot.kind is not None}

    def build(key: str, context: BuildContext) -> Any:
        if key not in slots:
            raise KeyError(f"detector {model.detector.name!r} declares no part slot {key!r} (slots: "
                           f"{', '.join(slots)})")
        part, slot = model.slots[key], slots[key]
        if part is None:
            return None
        if slot.choices and part.name not in slot.choices:  # checked when built: such a config still loads
            raise ConfigError(f"model.{key}.name={part.name!r}: detector {model.detector.name!r} takes "
                              f"{' or '.join(map(repr, slot.choices))} there")
        kind = registries.part_kind(slot.kind)
        entry = registries.kind(kind.plural).get(part.name)
        with plugin_errors(registries, entry, f"model.{key}: {kind.key} {part.name!r}"):
            return call_builder(kind, entry, part.settings, context)

    return build


def build_detector(model: ModelConfig, registries, num_classes: int, class_names=None):
    """The detector ``model.detector`` names, from the bound model."""
    bind_model(model, registries)
    entry = registries.detectors.get(model.detector.name)
    context = DetectorContext(model=model, num_classes=num_classes, class_names=list(class_names) if class_names
                              else None, registries=registries, build=slot_builder(model, registries))
    with plugin_errors(registries, entry, f"model.detector: detector {entry.name!r}"):
        return call_builder(registries.part_kind("detector"), entry, model.detector.settings, context)


@contextmanager
def plugin_errors(registries, entry, what: str) -> Iterator[None]:
    """Around the call of a third-party plugin's builder: an exception it raises (other than a message meant
    for the user: ConfigError, PluginError, UnknownNameError, OSError) becomes a :class:`PluginError` naming
    ``what`` (``"model.neck: neck 'bifpn'"``), the plugin, its distribution and the error, so ``train`` ends
    with one line and exit 2 instead of a traceback from inside the plugin. A built-in plugin's exception is
    detkit's own bug and keeps its traceback, as every one does with ``DETKIT_DEBUG=1``."""
    try:
        yield
    except (ConfigError, PluginError, UnknownNameError, OSError):
        raise
    except Exception as exc:
        record = getattr(registries, "plugins", {}).get(entry.plugin)
        if record is None or record.builtin or os.environ.get("DETKIT_DEBUG"):
            raise
        raise PluginError(f"{what} of plugin {entry.plugin!r} ({record.origin}) failed to build: "
                          f"{type(exc).__name__}: {exc} (a bug in that plugin, or a setting it does not check; "
                          f"DETKIT_DEBUG=1 shows the traceback)") from exc
