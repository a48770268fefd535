"""Choosing the training schedule and running it.

A schedule is a registered part (hook ``detkit_register_schedules``) like any other: a function that trains
the configured detector, in one trainer run (``end_to_end``) or in stages that drive the trainer
(``four_step``, ``svm_posthoc``). ``train.schedule`` names it; a schedule registered with ``default=True``
(``end_to_end``, the config's default) gives way to the schedule a chosen part of the model declares in its
registration (``schedule=...``: the ``svm`` head declares ``svm_posthoc``). Nothing here knows any schedule or
part by name.
"""
from __future__ import annotations

import os

from detkit.config import Config, ConfigError, ModelConfig, PartConfig, bind_parts
from detkit.plugins import Entry, UnknownNameError
from detkit.registry.binding import bind_part, call_builder, detector_slots
from detkit.registry.contexts import ScheduleContext
from detkit.training.preflight import (check_before_training, make_paths_absolute, prepare_work_dir,
                                      work_dir_lock)


def chosen_parts(model: ModelConfig, registries) -> list[tuple[str, str, str]]:
    """``(kind, config key, name)`` of every part a bound model chooses: the backbone, the detector and the part
    in each of its slots."""
    parts = [("backbone", "model.backbone.name", model.backbone.name),
             ("detector", "model.detector.name", model.detector.name)]
    for slot in detector_slots(model, registries):
        part = model.slots.get(slot.key)
        if slot.kind is not None and isinstance(part, PartConfig):
            parts.append((slot.kind, f"model.{slot.key}.name", part.name))
    return parts


def declared_schedules(model: ModelConfig, registries) -> dict[str, list[str]]:
    """The schedules the chosen parts declare: ``{schedule: ["model.box_predictor.name='svm'", ...]}``, from
    every kind of part that may declare one (:attr:`detkit.registry.kinds.PartKind.schedules`)."""
    bind_parts(model, registries)
    declared: dict[str, list[str]] = {}
    for kind, key, name in chosen_parts(model, registries):
        if not registries.part_kind(kind).schedules:
            continue
        schedule = registries.kind(kind).get(name).info.get("schedule")
        if schedule:
            declared.setdefault(schedule, []).append(f"{key}={name!r}")
    return declared


def resolve_schedule(cfg: Config, registries) -> tuple[Entry, str]:
    """The schedule that trains ``cfg`` and why it was chosen (the config key or the declaring part)."""
    requested = _schedule(registries, cfg.train.schedule.name, f"train.schedule={cfg.train.schedule.name!r}")
    if not requested.info.get("default"):
        return requested, f"train.schedule={requested.name!r}"
    declared = declared_schedules(cfg.model, registries)
    if len(declared) > 1:
        listed = "; ".join(f"{', '.join(parts)} needs {name!r}" for name, parts in declared.items())
        raise ConfigError(f"the model's parts need different training schedules: {listed}")
    if not declared:
        return requested, f"train.schedule={requested.name!r}"
    (name, parts), = declared.items()
    reason = f"{', '.join(parts)} (schedule {name!r})"
    return _schedule(registries, name, reason), reason


def _schedule(registries, name: str, reason: str) -> Entry:
    try:
        return registries.schedules.get(name)
    except UnknownNameError as exc:
        raise ConfigError(f"{reason}: {exc}") from None


def train(cfg: Config, registries, resume: str | bool | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train the configured detector by its schedule; returns ``{"checkpoint": path, "metrics": dict | None,
    "model": nn.Module}``. The model's part sections, the paths of the config and the work directory are
    checked first (:mod:`detkit.training.preflight`): a work directory holding a finished run is refused
    unless ``resume`` continues it or ``overwrite`` removes its files first."""
    bind_parts(cfg, registries)
    make_paths_absolute(cfg, registries)  # recorded so in every checkpoint: found from any directory
    schedule, reason = resolve_schedule(cfg, registries)
    if schedule.info.get("single_process") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{reason}: this schedule trains in stages in one process; run it without torchrun "
                          f"(each step may still use a GPU)")
    check_before_training(cfg, registries, resume, overwrite)
    with work_dir_lock(cfg.train.work_dir):
        prepare_work_dir(cfg.train.work_dir, resume, overwrite)
        part = cfg.train.schedule if schedule.name == cfg.train.schedule.name else bind_part(
            registries.part_kind("schedule"), PartConfig(schedule.name), "train.schedule", registries)  # a declared one: its defaults
        context = ScheduleContext(config=cfg, registries=registries, resume=resume, progress=progress)
        return call_builder(registries.part_kind("schedule"), schedule, part.settings, context)
