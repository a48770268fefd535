"""Loading configs: YAML with ``base:`` chains, ``--set`` overrides, validation into the schema with
messages that name the file (or the override) and the key path, and writing configs back."""
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
from typing import Any, Union

import yaml

from detkit.config.core import ConfigError, PartConfig, deep_merge
from detkit.config.schema import Config
from detkit.config.upgrades import upgrade


# ----------------------------------------------------------------------------- loading

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a file over 1 MiB is not one (and parsing it takes minutes)
MAX_YAML_NODES = 100_000  # values a YAML text may stand for with its aliases expanded


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document whose aliases expand past :data:`MAX_YAML_NODES` values (a
    "billion laughs" text of a few hundred bytes stands for billions, which every later walk of the config
    would expand) or refer to themselves."""

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:
            key = id(n)
            if key in sizes:
                if sizes[key] < 0:
                    raise ConfigError(f"{self.name}: an alias refers to the collection that holds it")
                return sizes[key]
            sizes[key] = -1  # being counted
            children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else
                        n.value if isinstance(n, yaml.SequenceNode) else [])
            total = 1
            for child in children:
                total += size(child)
                if total > MAX_YAML_NODES:
                    raise ConfigError(f"{self.name}: its aliases expand to more than {MAX_YAML_NODES} values; a "
                                      f"config is far smaller (is this a YAML bomb?)")
            sizes[key] = total
            return total

        if node is not None:
            size(node)
        return node


def safe_load_yaml(text_or_file, name: str) -> Any:
    """``yaml.safe_load`` with aliases bounded (:class:`_BoundedLoader`); ConfigError naming ``name`` for a text
    it refuses or nesting too deep to read; ``yaml.YAMLError`` for invalid YAML, as ``yaml.safe_load``."""
    loader = _BoundedLoader(text_or_file)
    loader.name = name
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


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


def origin_of(source: str | Origin, path: str) -> str:
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
        raise ConfigError(f"{origin_of(source, path)}: {path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build_dataclass(tp, value, path, source)
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
    raise ConfigError(f"{origin_of(source, path)}: {path}: expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _check_range(f: dataclasses.Field, value: Any, path: str, source: str | Origin) -> None:
    """Fail naming the key, the value and the allowed range when a number of ``value`` (a number, or a list
    of them) lies outside the range the field declares (:func:`ranged`)."""
    if f.metadata.get("nonempty") and isinstance(value, list) and not value:
        raise ConfigError(f"{origin_of(source, path)}: {path}=[]: expected at least one value")
    bounds = f.metadata.get("range")
    if bounds is None or value is None:
        return
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not bounds.admits(v):
            key = f"{path}[{i}]" if isinstance(value, list) else path
            kind = "an integer" if isinstance(v, int) else "a number"
            raise ConfigError(f"{origin_of(source, key)}: {key}={v!r}: expected {kind} {bounds}")


def closest_hint(key: str, valid: list[str], parent: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    prefix = f"{parent}." if parent else ""
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def build_dataclass(cls: type, data: dict, path: str, source: str | Origin):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    open_field = next((f.name for f in fields.values() if f.metadata.get("open")), None)
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if open_field and (key not in hints or key == open_field):  # a slot section, checked when bound
            kwargs.setdefault(open_field, {})[key] = copy.deepcopy(value)
            continue
        if key not in hints:
            raise ConfigError(f"{origin_of(source, full)}: unknown key {full!r}{closest_hint(str(key), list(fields), path)}")
        if typing.get_origin(hints[key]) is list and typing.get_args(hints[key]) == (PartConfig,):  # parts
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{origin_of(source, full)}: {full}: expected a list of registered names or "
                                  f"mappings {{name: ..., <its settings>}}, got {value!r}")
            kwargs[key] = [part_section(v, None, f"{full}[{i}]", source) for i, v in enumerate(value)]
        elif PartConfig in (hints[key], *typing.get_args(hints[key])):  # a part section (or None, if optional)
            optional = hints[key] is not PartConfig
            kwargs[key] = None if optional and value is None else part_section(
                value, _default_part_name(fields[key]), full, source)
        else:
            kwargs[key] = _convert(value, hints[key], full, source)
            _check_range(fields[key], kwargs[key], full, source)
    return cls(**kwargs)


def _default_part_name(f: dataclasses.Field) -> str | None:
    """The name of the part a part field chooses by default (None for an optional part left out)."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return getattr(default, "name", None)


def part_section(value: Any, default_name: str, path: str, source: str | Origin) -> PartConfig:
    """A part section: a registered name, or ``{name: ..., <settings>}`` (no ``name``: the default part)."""
    if isinstance(value, PartConfig):
        return copy.deepcopy(value)
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{origin_of(source, path)}: {path}: expected a registered name or a mapping "
                          f"{{name: ..., <its settings>}}, got {value!r}")
    settings = copy.deepcopy(value)
    name = settings.pop("name", default_name)
    if name is None:
        raise ConfigError(f"{origin_of(source, path)}: {path}.name: missing (a registered name chooses the part)")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{origin_of(source, path + '.name')}: {path}.name: expected a registered name, got {name!r}")
    return PartConfig(name, settings)


def bind_parts(cfg: Any, registries, source: str | Origin = "config") -> Any:
    """Bind a config to the parts it chooses (``registries.bind``, :mod:`detkit.registry.binding`): the
    detector and its slot sections, the schedule, each checked against the settings class its part registered
    (unknown keys get the closest valid key, wrong types the expected type, numbers out of range the range)
    and replaced by that class's instance, defaults filled in. Returns ``cfg``."""
    return registries.bind(cfg, source)


def read_yaml_file(path: str, error: type[Exception] = ConfigError, what: str = "a config file") -> Any:
    """The YAML file at ``path`` read as :func:`safe_load_yaml` does (aliases bounded), refused with ``error``
    naming the file when it is over :data:`MAX_CONFIG_BYTES`, not YAML or not UTF-8 (``what`` it should be)."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise error(f"{path}: {size / 2**20:.1f} MiB; {what} is at most {MAX_CONFIG_BYTES // 2**20} MiB (a few KB "
                    f"is usual): is this the right file?")
    try:
        with open(path, encoding="utf-8") as f:
            return safe_load_yaml(f, path)
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc})") from None
    except ConfigError as exc:  # the alias bound
        if error is ConfigError:
            raise
        raise error(str(exc)) from None


def load_yaml(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict:
    """Read a config file and its ``base:`` chain into one merged mapping."""
    path = os.path.abspath(os.fspath(path))
    if path in _chain:
        raise ConfigError(f"{path}: circular base chain: {' -> '.join(_chain + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml_file(path)
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
    return deep_merge(load_yaml(base_path, _chain + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: empty key in {key!r}")
    try:
        value = safe_load_yaml(raw, f"--set {key}") if raw.strip() else None
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
    data = upgrade(data, str(source), schema)
    cfg = build_dataclass(schema, data, "", origin)
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
    return registries.bind(cfg, os.fspath(path)) if registries is not None and schema is Config else cfg


def to_dict(cfg: Any) -> Any:
    """Plain data (what a file or a checkpoint holds); a part section is ``{name: ..., <settings>}``."""
    if isinstance(cfg, PartConfig):
        settings = dataclasses.asdict(cfg.settings) if cfg.bound else cfg.settings
        return {"name": cfg.name, **copy.deepcopy(settings)}
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            value = to_dict(getattr(cfg, f.name))
            out.update(value if f.metadata.get("open") else {f.name: value})  # slot sections under their keys
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return copy.deepcopy(cfg)


def dump(cfg: Any) -> str:
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
            raise ConfigError(f"{source}: unknown key {path + '.' + key!r}{closest_hint(key, valid, path)}")
    for n, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs:
            raise ConfigError(f"{source}: missing key {path + '.' + n!r}")
