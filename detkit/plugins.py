"""Plugin discovery (pluggy) and the name registries it fills.

Built-in plugins and third-party plugins load through the same path: every
entry point of the ``detkit`` group is imported and registered with a fresh
:class:`pluggy.PluginManager`. A plugin that fails to import is reported by
name with its error and skipped; a hook function whose name matches no hook
specification is rejected (``check_pending``), so a typo is an error rather
than silence.

Environment variables:
    DETKIT_DISABLE_PLUGIN_AUTOLOAD=1  load no entry points at all.
    DETKIT_PLUGINS=mod_a,mod_b        additionally import and register these modules.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from detkit import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "detkit"
DISABLE_ENV = "DETKIT_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_ENV = "DETKIT_PLUGINS"

#: hook name -> registry kind (the word used by ``detkit list KIND`` and in configs)
KINDS = {
    "detkit_register_backbones": "backbones",
    "detkit_register_necks": "necks",
    "detkit_register_proposal_generators": "proposal_generators",
    "detkit_register_roi_extractors": "roi_extractors",
    "detkit_register_box_heads": "box_heads",
    "detkit_register_heads": "heads",
    "detkit_register_detectors": "detectors",
    "detkit_register_datasets": "datasets",
    "detkit_register_schedules": "schedules",
}


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered part. ``settings`` is the part's settings dataclass (the keys of its config section
    besides ``name``), or None for a part that has none or takes its keys as builder arguments (backbones'
    ``args``, datasets)."""

    name: str
    builder: Callable[..., Any]
    plugin: str
    info: dict = field(default_factory=dict)
    settings: type | None = None


class Registry:
    """Names of one kind of part -> :class:`Entry`. Duplicates raise."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, builder: Callable[..., Any], plugin: str, settings: type | None = None,
                 **info) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind[:-1]} with an invalid name {name!r}")
        if not callable(builder):
            raise PluginError(f"plugin {plugin!r} registered {self.kind[:-1]} {name!r} with a non-callable builder")
        if settings is not None and not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
            raise PluginError(f"plugin {plugin!r} registered {self.kind[:-1]} {name!r} with settings={settings!r}: "
                              f"expected a dataclass (its fields are the part's config keys)")
        if settings is not None and "name" in {f.name for f in dataclasses.fields(settings)}:
            raise PluginError(f"plugin {plugin!r} registered {self.kind[:-1]} {name!r} with settings "
                              f"{settings.__name__} that has a field 'name' (the key that chooses the part)")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"duplicate {self.kind[:-1]} name {name!r}: registered by plugin {other!r} and by plugin {plugin!r}"
            )
        self._entries[name] = Entry(name, builder, plugin, dict(info), settings)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind[:-1]} {name!r}{hint} (registered: {', '.join(sorted(self._entries)) or 'none'})"
            ) from None

    def build(self, name: str, **kwargs):
        return self.get(name).builder(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]


class Registries:
    """All registries of one plugin manager, by kind (``registries.backbones``)."""

    def __init__(self, pm: pluggy.PluginManager):
        self.plugin_manager = pm
        self.load_errors: dict[str, str] = getattr(pm, "detkit_load_errors", {})
        self._by_kind = {kind: Registry(kind) for kind in KINDS.values()}
        for hook_name, kind in KINDS.items():
            registry = self._by_kind[kind]
            hook = getattr(pm.hook, hook_name)
            # Call implementations one by one so each name is attributed to its plugin.
            for impl in hook.get_hookimpls():
                plugin = impl.plugin_name

                def register(name, builder, _plugin=plugin, _registry=registry, **info):
                    _registry.register(name, builder, _plugin, **info)

                impl.function(register=register)

    def __getattr__(self, kind: str) -> Registry:
        try:
            return self.__dict__["_by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None

    def kind(self, kind: str) -> Registry:
        if kind not in self._by_kind:
            raise UnknownNameError(f"unknown kind {kind!r}; expected one of {', '.join(self._by_kind)}")
        return self._by_kind[kind]

    @property
    def kinds(self) -> list[str]:
        return list(self._by_kind)


def _register_module(pm: pluggy.PluginManager, name: str, load: Callable[[], Any], errors: dict) -> None:
    try:
        plugin = load()
    except Exception as exc:  # a broken plugin must not take the others down
        msg = f"{type(exc).__name__}: {exc}"
        errors[name] = msg
        warnings.warn(f"detkit plugin {name!r} failed to load and was skipped: {msg}", RuntimeWarning, stacklevel=3)
        return
    if pm.is_registered(plugin):
        return
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:  # plugin name already taken
        raise PluginError(f"detkit plugin {name!r} could not be registered: {exc}") from None
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"detkit plugin {name!r} is invalid: {exc}") from None


def get_plugin_manager(autoload: bool | None = None, plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with every ``detkit`` entry point loaded.

    autoload: load entry points; defaults to true unless
        ``DETKIT_DISABLE_PLUGIN_AUTOLOAD`` is set.
    plugins: extra plugin objects (modules, or anything with hookimpls) to register.
    """
    pm = pluggy.PluginManager("detkit")
    pm.add_hookspecs(hookspecs)
    errors: dict[str, str] = {}
    if autoload is None:
        autoload = os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")
    if autoload:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            _register_module(pm, ep.name, ep.load, errors)
    for modname in filter(None, (m.strip() for m in os.environ.get(EXTRA_ENV, "").split(","))):
        _register_module(pm, modname, lambda m=modname: importlib.import_module(m), errors)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        _register_module(pm, name, lambda p=plugin: p, errors)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"detkit plugin {exc.plugin_name if hasattr(exc, 'plugin_name') else ''!s} "
                          f"has a hook that matches no hook specification: {exc}") from None
    pm.detkit_load_errors = errors
    return pm


def get_registries(pm: pluggy.PluginManager | None = None) -> Registries:
    return Registries(pm if pm is not None else get_plugin_manager())
