"""The registries: one per kind of part, filled by calling every loaded plugin's hooks, each plugin's
registrations checked as a whole (see :mod:`detkit.plugins` for discovery)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from detkit.registry.binding import bind_config
from detkit.registry.kinds import KINDS as PART_KINDS, PartKind, Slot
from detkit.registry.records import (DISABLE_PLUGINS_ENV, NameConflictError, PluginError, PluginRecord,
                                     PluginWarning, UnknownNameError, describe_exception)


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


def registration_problem(kind: str, name: Any, builder: Any, settings: Any, info: dict | None = None,
                         kinds: dict[str, PartKind] | None = None) -> str | None:
    """Why a ``register(name, builder, settings, **info)`` call of a ``kind`` hook is invalid, or None
    (``kinds``: the manager's table by key, the built-in one by default)."""
    part = kind[:-1]
    if not isinstance(name, str) or not name:
        return f"registered a {part} with an invalid name {name!r} (expected a non-empty string)"
    if not callable(builder):
        return f"registered {part} {name!r} with a non-callable builder {builder!r}"
    if settings is not None and not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        return (f"registered {part} {name!r} with settings={settings!r}: expected a dataclass (its fields are "
                f"the part's config keys)")
    if settings is not None and "name" in {f.name for f in dataclasses.fields(settings)}:
        return (f"registered {part} {name!r} with settings {settings.__name__} that has a field 'name' (the key "
                f"that chooses the part)")
    return _declaration_problem(kind, name, info or {}, kinds or {k.key: k for k in PART_KINDS})


def _declaration_problem(kind: str, name: str, info: dict, kinds: dict[str, PartKind]) -> str | None:
    """Why the declarations of a registration are invalid: a detector's ``slots``, a ``schedule`` declared by a
    kind that may not declare one."""
    by_plural = {k.plural: k for k in kinds.values()}
    if "schedule" in info and kind in by_plural and not by_plural[kind].schedules:
        return f"registered {kind[:-1]} {name!r} with schedule=: a {kind[:-1]} declares no training schedule"
    if kind != "detectors":
        return None
    slots = info.get("slots", ())
    if not isinstance(slots, (list, tuple)) or not all(isinstance(s, Slot) for s in slots):
        return (f"registered detector {name!r} with slots={slots!r}: expected a list of detkit.registry.kinds.Slot")
    keys = [s.key for s in slots]
    duplicate = sorted({k for k in keys if keys.count(k) > 1})
    if duplicate:
        return f"registered detector {name!r} with slot {duplicate[0]!r} twice"
    problems = [p for p in (s.problem(kinds) for s in slots) if p]
    return f"registered detector {name!r}: {problems[0]}" if problems else None


class Registry:
    """Names of one kind of part -> :class:`Entry`.

    ``plugins`` (name -> :class:`PluginRecord`) lets an unknown name be traced to a plugin that failed and a
    name two plugins registered be reported with both.
    """

    def __init__(self, kind: str, plugins: dict[str, PluginRecord] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._conflicts: dict[str, list[Entry]] = {}
        self._plugins = plugins if plugins is not None else {}

    def register(self, name: str, builder: Callable[..., Any], plugin: str, settings: type | None = None,
                 **info) -> None:
        """Add one part; an invalid registration or a name already taken raises :class:`PluginError`."""
        problem = registration_problem(self.kind, name, builder, settings, info)
        if problem:
            raise PluginError(f"plugin {plugin!r} {problem}")
        if name in self:
            others = " and ".join(repr(e.plugin) for e in self._claims(name))
            raise PluginError(f"duplicate {self.kind[:-1]} name {name!r}: registered by plugin {others} and by "
                              f"plugin {plugin!r}")
        self._entries[name] = Entry(name, builder, plugin, dict(info), settings)

    def add(self, entry: Entry) -> None:
        """Add a checked entry; a name already registered becomes a conflict (asking for it is an error, and
        a :class:`PluginWarning` says so now)."""
        claims = self._claims(entry.name)
        if not claims:
            self._entries[entry.name] = entry
            return
        self._entries.pop(entry.name, None)
        self._conflicts[entry.name] = [*claims, entry]
        warnings.warn(f"{self.kind[:-1]} {entry.name!r} is registered by plugin {claims[0].plugin!r} and by plugin "
                      f"{entry.plugin!r}: a command that asks for it fails; uninstall one of them or disable it "
                      f"with {DISABLE_PLUGINS_ENV}", PluginWarning, stacklevel=2)

    def _claims(self, name: str) -> list[Entry]:
        return self._conflicts.get(name) or ([self._entries[name]] if name in self._entries else [])

    def owner(self, name: str) -> str | None:
        """The plugin that registered ``name`` (the first one, for a conflict), or None."""
        claims = self._claims(name)
        return claims[0].plugin if claims else None

    def conflicts(self) -> dict[str, list[str]]:
        """Names several plugins registered -> those plugins."""
        return {name: [e.plugin for e in entries] for name, entries in self._conflicts.items()}

    def get(self, name: str) -> Entry:
        if name in self._entries:
            return self._entries[name]
        if name in self._conflicts:
            plugins = [self._describe(e.plugin) for e in self._conflicts[name]]
            raise NameConflictError(
                f"{self.kind[:-1]} {name!r} is registered by more than one plugin: {' and by '.join(plugins)}; "
                f"uninstall one of them or disable it with {DISABLE_PLUGINS_ENV}="
                f"{self._conflicts[name][-1].plugin}")
        raise self._unknown(name)

    def _describe(self, plugin: str) -> str:
        record = self._plugins.get(plugin)
        return f"plugin {plugin!r}" + (f" ({record.origin})" if record else "")

    def _unknown(self, name: Any) -> UnknownNameError:
        part, records = self.kind[:-1], list(self._plugins.values())
        for record in records:
            if record.status == "failed" and name in record.attempted.get(self.kind, ()):
                return UnknownNameError(f"unknown {part} {name!r}: plugin {record.name!r} failed to load "
                                        f"({record.origin}): {record.error}")
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown {part} {name!r}{hint}"
        for record in records:  # failed before registering anything: it may be the one that provides it
            if record.status == "failed" and not record.attempted:
                message += (f"; plugin {record.name!r} failed to load ({record.origin}), so nothing it registers "
                            f"is available: {record.error}")
        disabled = [r.name for r in records if r.status == "disabled"]
        if disabled:
            message += f"; disabled by {DISABLE_PLUGINS_ENV}: {', '.join(disabled)}"
        return UnknownNameError(f"{message} (registered: {', '.join(sorted(self._entries)) or 'none'})")

    def build(self, name: str, **kwargs):
        return self.get(name).builder(**kwargs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._conflicts)

    def __iter__(self):
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]


#: one staged ``register`` call: (kind, name, builder, settings, info)
Registration = tuple[str, Any, Any, Any, dict]


class Registries:
    """All registries of one plugin manager, by kind (``registries.backbones``).

    Each plugin's hooks are called first and its registrations checked as a whole: a plugin whose hook
    raises or whose registrations are invalid (a bad name or builder, a name registered twice, a name a
    built-in plugin provides) is skipped with none of its parts kept. Built-in plugins are filed first.
    ``plugins``: every plugin's :class:`PluginRecord` (loaded, failed, disabled), in load order; ``notes``:
    what else loading found wrong (a ``DETKIT_DISABLE_PLUGINS`` name that is no plugin).
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.plugin_manager = pm
        self.plugins = _records(pm)
        self.notes: list[str] = list(getattr(pm, "detkit_notes", []))
        #: the kinds of part, by key: the table (:data:`detkit.registry.kinds.KINDS`) and those plugins declare
        self.part_kinds: dict[str, PartKind] = {k.key: k for k in getattr(pm, "detkit_kinds", PART_KINDS)}
        self._by_kind = {kind.plural: Registry(kind.plural, self.plugins) for kind in self.part_kinds.values()}
        staged = self._call_hooks(pm)
        for builtin in (True, False):
            for record in self.plugins.values():
                if record.status == "loaded" and record.builtin == builtin:
                    self._file(record, staged.get(record.name, []))

    def _call_hooks(self, pm: pluggy.PluginManager) -> dict[str, list[Registration]]:
        staged: dict[str, list[Registration]] = {}
        hooks = {h: k.plural for k in self.part_kinds.values() for h in (k.hook, *k.legacy_hooks)}
        for hook_name, kind in hooks.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                record = self.plugins[impl.plugin_name]
                if record.status != "loaded":
                    continue
                calls = staged.setdefault(record.name, [])

                def register(name, builder=None, settings=None, _calls=calls, _kind=kind, **info):
                    _calls.append((_kind, name, builder, settings, info))

                try:
                    impl.function(register=register)
                except (Exception, SystemExit) as exc:  # the plugin's bug: skip the plugin, keep the others
                    record.fail(f"its hook {hook_name} raised {describe_exception(exc)}", _names(calls))
        return staged

    def _file(self, record: PluginRecord, calls: list[Registration]) -> None:
        problems, seen = [], set()
        for kind, name, builder, settings, info in calls:
            problem = registration_problem(kind, name, builder, settings, info, self.part_kinds)
            if problem is None and (kind, name) in seen:
                problem = f"registered {kind[:-1]} {name!r} twice"
            owner = self._by_kind[kind].owner(name) if problem is None else None
            if not record.builtin and owner is not None and self.plugins[owner].builtin:
                problem = (f"registered {kind[:-1]} {name!r}, which built-in plugin {owner!r} provides; give it "
                           f"another name")
            seen.add((kind, name))
            if problem and problem not in problems:
                problems.append(problem)
        if problems:
            record.fail("; ".join(problems), _names(calls))
            return
        for kind, name, builder, settings, info in calls:
            self._by_kind[kind].add(Entry(name, builder, record.name, dict(info), settings))
        record.registered = _names(calls)

    @property
    def load_errors(self) -> dict[str, str]:
        """Plugin name -> why it was skipped."""
        return {name: r.error for name, r in self.plugins.items() if r.status == "failed"}

    def __getattr__(self, kind: str) -> Registry:
        registries = self.__dict__.get("_by_kind", {})
        if kind in registries:
            return registries[kind]
        if any(kind in k.legacy_plurals for k in self.__dict__.get("part_kinds", {}).values()):
            return self.kind(kind)
        raise AttributeError(kind)

    def kind(self, kind: str) -> Registry:
        """The registry of a kind, by its plural (``box_predictors``) or singular (``box_predictor``) word; a
        name of an earlier release (``heads``) works with a deprecation warning naming the new one."""
        return self._by_kind[self.part_kind(kind).plural]

    def part_kind(self, word: str) -> PartKind:
        """The :class:`~detkit.registry.kinds.PartKind` a word names (key, plural, or a deprecated plural)."""
        for k in self.part_kinds.values():
            if word in (k.key, k.plural):
                return k
            if word in k.legacy_plurals:
                warnings.warn(f"the {word!r} registry is now called {k.plural!r}", DeprecationWarning, stacklevel=3)
                return k
        raise UnknownNameError(f"unknown kind {word!r}; expected one of {', '.join(self._by_kind)}")

    def bind(self, cfg, source="config"):
        """``cfg`` bound to the parts it chooses from these registries (:func:`detkit.registry.binding.bind_config`)."""
        return bind_config(cfg, self, source)

    @property
    def kinds(self) -> list[str]:
        return list(self._by_kind)


def _names(calls: list[Registration]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for kind, name, *_ in calls:
        if isinstance(name, str) and name not in names.setdefault(kind, []):
            names[kind].append(name)
    return names


def _records(pm: pluggy.PluginManager) -> dict[str, PluginRecord]:
    """Copies of the manager's plugin records (a manager built by hand gets plain ones)."""
    records = {name: copy.deepcopy(r) for name, r in getattr(pm, "detkit_plugins", {}).items()}
    for name, plugin in pm.list_name_plugin():
        if plugin is not None and name not in records:
            records[name] = PluginRecord(name)
    return records
