"""Configs of earlier layouts: the schema version and the steps that bring a file up to it."""
from __future__ import annotations

import copy
import dataclasses
import warnings

from detkit.config.core import ConfigError, PartConfig, as_part, deep_merge
from detkit.config.schema import CONFIG_VERSION, Config


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
            model["box_predictor"] = deep_merge(as_part(moved), as_part(model.get("box_predictor", {})))
            notes.append(f"model.roi_head.{{{','.join(moved)}}} -> model.box_predictor.{{{','.join(moved)}}}")
        if old:
            model["roi_heads"] = deep_merge(old, model.get("roi_heads") or {})
            notes.append("model.roi_head.* -> model.roi_heads.*")
    elif old is not None:
        model["roi_head"] = old  # not a mapping: the schema reports it
    defaults = {"proposal_generator": "rpn", "box_predictor": "softmax_box"}
    for section, (part_key, takers) in _LEGACY_PART_SECTIONS.items():
        if section not in model:
            continue
        value = model.pop(section)
        part = as_part(model.get(part_key, defaults[part_key]))
        name = part.get("name", defaults[part_key])
        if name not in takers or not isinstance(value, dict):
            notes.append(f"model.{section} dropped: it configures {' / '.join(map(repr, takers))}, and "
                         f"model.{part_key} is {name!r}")
            continue
        if name == "precomputed":
            value = {k: v for k, v in value.items() if k in _PRECOMPUTED_KEYS}
        nested = takers[name]
        moved = {nested: value} if nested else value
        model[part_key] = deep_merge(moved, part)  # keys given in the new place win
        notes.append(f"model.{section}.* -> model.{part_key}.{nested + '.' if nested else ''}*")
    for note in notes:
        warnings.warn(f"{source}: deprecated config key: {note}", ConfigDeprecationWarning, stacklevel=3)
    return {**data, "model": model}


def _rename_lr_schedule(data: dict, source: str) -> dict:
    """Version 2 -> 3, both schemas: ``train.lr_schedule`` is ``train.lr_policy`` ("schedule" names the
    training recipe, ``train.schedule``)."""
    train = data.get("train")
    if not isinstance(train, dict) or "lr_schedule" not in train:
        return data
    train = dict(train)
    policy = train.pop("lr_schedule")
    train.setdefault("lr_policy", policy)
    warnings.warn(f"{source}: deprecated config key: train.lr_schedule -> train.lr_policy", ConfigDeprecationWarning,
                  stacklevel=5)
    return {**data, "train": train}


def _upgrade_2_to_3(data: dict, source: str) -> dict:
    """Version 2 -> 3: ``train.four_step_iters`` is the ``four_step`` schedule's ``iters`` setting
    (``train.schedule: {name: four_step, iters: [...]}``); for another schedule it configured nothing and goes."""
    data = _rename_lr_schedule(data, source)
    train = data.get("train")
    if not isinstance(train, dict) or "four_step_iters" not in train:
        return data
    train = dict(train)
    iters = train.pop("four_step_iters")
    schedule = as_part(train.get("schedule", "end_to_end"))
    if schedule.get("name", "end_to_end") == "four_step":
        train["schedule"] = {"iters": iters, **schedule}  # a key given in the new place wins
        note = "train.four_step_iters -> train.schedule.iters (train.schedule: {name: four_step, iters: [...]})"
    else:
        note = f"train.four_step_iters dropped: it configures the 'four_step' schedule, not {schedule.get('name')!r}"
    warnings.warn(f"{source}: deprecated config key: {note}", ConfigDeprecationWarning, stacklevel=4)
    return {**data, "train": train}


def _classifier_2_to_3(data: dict, source: str) -> dict:
    """Version 2 -> 3 of a pretraining config: its ``train`` section no longer has the detection schedule
    keys; the values version 2 stored by default go silently, any other is refused as it was then."""
    data = _rename_lr_schedule(data, source)
    train = data.get("train")
    if not isinstance(train, dict) or not {"schedule", "four_step_iters"} & set(train):
        return data
    train = dict(train)
    train.pop("four_step_iters", None)
    if train.get("schedule", "end_to_end") != "end_to_end":
        raise ConfigError(f"{source}: train.schedule={train['schedule']!r}: pretraining is one run of SGD; the "
                          f"detection schedules do not apply (remove the key)")
    train.pop("schedule", None)
    return {**data, "train": train}


#: schema -> {version: the step that brings data of that version to the next}
_UPGRADES = {"Config": {1: migrate_legacy, 2: _upgrade_2_to_3}, "ClassifierConfig": {2: _classifier_2_to_3}}


def upgrade(data: dict, source: str, schema: type = Config) -> dict:
    """Config data of an earlier layout brought up to :data:`CONFIG_VERSION`, one version at a time; a moved
    key is named in a :class:`ConfigDeprecationWarning`. Data without ``version`` is taken as the oldest layout
    (each step changes only the keys of its own version, so a current file passes through unchanged)."""
    steps = _UPGRADES.get(schema.__name__)
    if steps is None:
        return data
    version = data.get("version", min(steps))
    if not isinstance(version, int) or isinstance(version, bool) or version > CONFIG_VERSION:
        raise ConfigError(f"{source}: version: {version!r} is no config layout this release reads (it reads "
                          f"1 to {CONFIG_VERSION}; a newer detkit wrote this file?)")
    for step in range(max(version, min(steps)), CONFIG_VERSION):
        data = steps[step](data, source) if step in steps else data
    return {**data, "version": CONFIG_VERSION} if data.get("version") != CONFIG_VERSION else data


#: keys of the earlier layout's sections that several parts shared, with their defaults there: a part that
#: does not take one ignores it (it configured another part), so configs and checkpoints of that layout load
_SHARED_LEGACY_KEYS = {
    "roi_extractor": {"output_size": None, "sampling_ratio": 0, "aligned": False, "levels": [6, 3, 2, 1],
                      "context_padding": 16, "warp_size": None, "warp_batch": 128},
    "box_predictor": {"dropout": 0.0},
}


def drop_shared_legacy_keys(path: str, part: PartConfig, cls: type, source: str) -> None:
    """Drop from a part section at ``path`` the keys of the version-1 layout's shared sections that its part
    does not take (they configured another part); a value other than that layout's default is named."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, default in _SHARED_LEGACY_KEYS.get(path.removeprefix("model."), {}).items():
        if name in part.settings and name not in fields:
            value = part.settings.pop(name)
            if value != default:
                warnings.warn(f"{source}: {path}.{name}={value!r} ignored: {part.name!r} takes no such key (the "
                              f"earlier layout shared one section between parts)", ConfigDeprecationWarning,
                              stacklevel=4)
