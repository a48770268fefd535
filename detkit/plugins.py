"""Plugin discovery (pluggy) and the name registries it fills.

Built-in plugins and third-party plugins load through the same path: every entry point of the ``detkit``
group, and every module ``DETKIT_PLUGINS`` names, is imported and registered with a fresh
:class:`pluggy.PluginManager`; :class:`Registries` then calls each plugin's hooks and files what it
registers in one :class:`Registry` per kind of part. One plugin's mistake is that plugin's problem: a
plugin that fails to import, has a hook function that matches no hook specification (a typo) or lacks
``@hookimpl``, raises in a hook, registers something invalid, or registers a name a built-in plugin
provides is skipped as a whole (none of its registrations kept) and reported with its name, distribution
and the reason (a :class:`PluginWarning`, :attr:`Registries.plugins`, ``detkit list plugins``); every
other plugin keeps working. Two third-party plugins that register the same name both stay loaded, and a
command that asks for that name fails naming both. A name that is unknown because its plugin failed says
so.

Environment variables:
    DETKIT_DISABLE_PLUGIN_AUTOLOAD=1  load no entry points at all (the built-in plugins neither).
    DETKIT_PLUGINS=mod_a,mod_b        additionally import and register these modules.
    DETKIT_DISABLE_PLUGINS=a,b        do not load these plugins (entry-point or module names).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import os
import textwrap
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pluggy

from detkit import hookspecs

ENTRY_POINT_GROUP = "detkit"
DISABLE_ENV = "DETKIT_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_ENV = "DETKIT_PLUGINS"
DISABLE_PLUGINS_ENV = "DETKIT_DISABLE_PLUGINS"
#: the distribution whose entry points are the built-in plugins
BUILTIN_DISTRIBUTION = "detkit"

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
    "detkit_register_classification_datasets": "classification_datasets",
    "detkit_register_schedules": "schedules",
}


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


class PluginWarning(RuntimeWarning):
    """A plugin was skipped (it is named with the reason), or ``DETKIT_DISABLE_PLUGINS`` names no plugin."""


class UnknownNameError(KeyError):
    """A name the registry cannot resolve to one part."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class NameConflictError(UnknownNameError):
    """A name two plugins registered: asking for it is an error naming both."""


@dataclass
class PluginRecord:
    """One plugin as detkit loaded it (``detkit list plugins`` prints these).

    name: the entry point's name (the module's for ``DETKIT_PLUGINS`` and plugins passed in).
    distribution, version: the installed package that provides it (None: none found).
    builtin: one of detkit's own plugins; their names win over third-party ones.
    status: "loaded", "failed" (skipped as a whole; ``error`` says why) or "disabled" (``DETKIT_DISABLE_PLUGINS``).
    registered: kind -> the names it registered.
    attempted: kind -> the names a failed plugin tried to register, where known (not for one that failed to
        import), so that asking for one of them names the failure.
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    status: str = "loaded"
    error: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)
    attempted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        if not self.distribution:
            return "no installed distribution"
        return f"{self.distribution} {self.version}" + (", built-in" if self.builtin else "")

    @property
    def failure(self) -> str:
        return f"plugin {self.name!r} failed to load and was skipped ({self.origin}): {self.error}"

    def fail(self, reason: str, attempted: dict[str, list[str]] | None = None) -> None:
        self.status, self.error, self.registered = "failed", " ".join(reason.split()), {}  # one line
        self.attempted = {kind: names for kind, names in (attempted or {}).items() if names}
        warnings.warn(self.failure, PluginWarning, stacklevel=2)


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


def registration_problem(kind: str, name: Any, builder: Any, settings: Any) -> str | None:
    """Why a ``register(name, builder, settings)`` call of a ``kind`` hook is invalid, or None."""
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
    return None


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
        problem = registration_problem(self.kind, name, builder, settings)
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
        return name in self._entries or name in self._conflicts

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
        self._by_kind = {kind: Registry(kind, self.plugins) for kind in KINDS.values()}
        staged = self._call_hooks(pm)
        for builtin in (True, False):
            for record in self.plugins.values():
                if record.status == "loaded" and record.builtin == builtin:
                    self._file(record, staged.get(record.name, []))

    def _call_hooks(self, pm: pluggy.PluginManager) -> dict[str, list[Registration]]:
        staged: dict[str, list[Registration]] = {}
        for hook_name, kind in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                record = self.plugins[impl.plugin_name]
                if record.status != "loaded":
                    continue
                calls = staged.setdefault(record.name, [])

                def register(name, builder=None, settings=None, _calls=calls, _kind=kind, **info):
                    _calls.append((_kind, name, builder, settings, info))

                try:
                    impl.function(register=register)
                except Exception as exc:  # the plugin's bug: skip the plugin, keep the others
                    record.fail(f"its hook {hook_name} raised {describe_exception(exc)}", _names(calls))
        return staged

    def _file(self, record: PluginRecord, calls: list[Registration]) -> None:
        problems, seen = [], set()
        for kind, name, builder, settings, _ in calls:
            problem = registration_problem(kind, name, builder, settings)
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


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line being the innermost frame in a source file."""
    machinery = ("<", os.path.dirname(importlib.__file__) + os.sep)  # frozen importlib, importlib/*.py
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(machinery) and f.filename != __file__]
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = ""  # its message names the file and line
    return f"{type(exc).__name__}: {exc}{where}"


def _did_you_mean(hook_name: str) -> str:
    close = difflib.get_close_matches(hook_name, list(KINDS), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def hook_problems(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """What keeps ``plugin``'s hook functions from being called: a ``@hookimpl`` whose name matches no hook
    specification, a ``detkit_register_*`` function without ``@hookimpl``."""
    problems = []
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            if attr.startswith("detkit_register") and callable(inspect.getattr_static(plugin, attr, None)):
                problems.append(f"function {attr} is not marked @hookimpl (from detkit.hookspecs import hookimpl)"
                                + ("" if attr in KINDS else f" and matches no hook{_did_you_mean(attr)}"))
            continue
        hook_name = opts.get("specname") or attr
        hook = getattr(pm.hook, hook_name, None)
        if (hook is None or not hook.has_spec()) and not opts.get("optionalhook"):
            problems.append(f"hook {hook_name} matches no hook specification{_did_you_mean(hook_name)}")
    return problems


def attempted_names(plugin: Any) -> dict[str, list[str]]:
    """The names a plugin that cannot be registered would register, as far as calling its hook functions
    (misspelt ones by the closest hook) tells: for the message of a name it would have provided."""
    names: dict[str, list[str]] = {}
    for attr in dir(plugin):
        close = difflib.get_close_matches(attr, list(KINDS), n=1) if attr.startswith("detkit_") else []
        function = getattr(plugin, attr, None) if close else None
        if not callable(function):
            continue
        found = names.setdefault(KINDS[close[0]], [])
        try:
            function(register=lambda name, *_, _found=found, **__: _found.append(name))
        except Exception:  # noqa: BLE001 - a broken hook tells nothing more
            pass
    return {kind: [n for n in found if isinstance(n, str)] for kind, found in names.items() if found}


def _env_names(variable: str) -> list[str]:
    return [m.strip() for m in os.environ.get(variable, "").split(",") if m.strip()]


def _distribution(dist) -> tuple[str | None, str | None]:
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _is_builtin(dist) -> bool:
    return dist is not None and (dist.metadata["Name"] or "").lower().replace("_", "-") == BUILTIN_DISTRIBUTION


def _module_distribution(module: str) -> tuple[str | None, str | None]:
    """The installed distribution that provides ``module`` (a ``DETKIT_PLUGINS`` entry), if any."""
    dists = importlib.metadata.packages_distributions().get(module.split(".")[0], [])
    if not dists:
        return None, None
    try:
        return dists[0], importlib.metadata.version(dists[0])
    except importlib.metadata.PackageNotFoundError:
        return dists[0], None


def _candidates(plugins: Iterable[Any]) -> list[tuple[PluginRecord, Callable[[], Any], bool]]:
    """Every plugin there is, built-ins first: its record, how to load it, and whether it is an entry point."""
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                 key=lambda e: (not _is_builtin(getattr(e, "dist", None)), e.name))
    builtin = {ep.module: _distribution(ep.dist) for ep in eps if _is_builtin(getattr(ep, "dist", None))}
    found = []
    for ep in eps:
        dist = getattr(ep, "dist", None)
        found.append((PluginRecord(ep.name, *_distribution(dist), builtin=_is_builtin(dist)), ep.load, True))
    for module in _env_names(EXTRA_ENV):
        origin = builtin.get(module) or _module_distribution(module)
        found.append((PluginRecord(module, *origin, builtin=module in builtin),
                      lambda m=module: importlib.import_module(m), False))
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        found.append((PluginRecord(name, *builtin.get(name, (None, None)), builtin=name in builtin),
                      lambda p=plugin: p, False))
    return found


def _load(pm: pluggy.PluginManager, record: PluginRecord, load: Callable[[], Any],
          records: dict[str, PluginRecord]) -> None:
    """Import and register one plugin; one that cannot be is recorded as failed."""
    taken = records.get(record.name)
    key = record.name if taken is None else f"{record.name} ({record.origin})"
    records[key] = record
    try:
        plugin = load()
    except Exception as exc:  # a broken plugin must not take the others down
        record.fail(describe_exception(exc))
        return
    if pm.is_registered(plugin):  # the same module twice (an entry point and DETKIT_PLUGINS)
        del records[key]
        return
    if taken is not None:
        record.fail(f"another plugin is named {record.name!r} ({taken.origin}); rename this entry point")
        return
    problems = hook_problems(pm, plugin)
    if problems:
        record.fail("; ".join(problems), attempted_names(plugin))
        return
    try:
        pm.register(plugin, name=record.name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        record.fail(str(exc), attempted_names(plugin))


def get_plugin_manager(autoload: bool | None = None, plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with every ``detkit`` entry point loaded; its ``detkit_plugins`` maps each
    plugin's name to its :class:`PluginRecord`.

    autoload: load entry points; defaults to true unless ``DETKIT_DISABLE_PLUGIN_AUTOLOAD`` is set.
    plugins: extra plugin objects (modules, or anything with hookimpls) to register.
    """
    pm = pluggy.PluginManager("detkit")
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")
    disabled = set(_env_names(DISABLE_PLUGINS_ENV))
    candidates = _candidates(plugins)
    records: dict[str, PluginRecord] = {}
    for record, load, entry_point in candidates:
        if entry_point and not autoload:
            continue
        if record.name in disabled:
            record.status = "disabled"
            records.setdefault(record.name, record)
        else:
            _load(pm, record, load, records)
    known = sorted({record.name for record, _, _ in candidates})
    pm.detkit_notes = [f"{DISABLE_PLUGINS_ENV} names {name!r}, which is no plugin (plugins: {', '.join(known)})"
                       for name in sorted(disabled - set(known))]
    for note in pm.detkit_notes:
        warnings.warn(note, PluginWarning, stacklevel=2)
    pm.detkit_plugins = records
    return pm


def get_registries(pm: pluggy.PluginManager | None = None) -> Registries:
    return Registries(pm if pm is not None else get_plugin_manager())


@contextlib.contextmanager
def collected_plugin_warnings() -> Iterator[list[str]]:
    """Inside, each :class:`PluginWarning` is collected (once, in order) instead of shown, for a command line
    that prints them as its own lines; other warnings are shown as usual."""
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)
        show = warnings.showwarning

        def collect(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, PluginWarning):
                show(message, category, filename, lineno, file, line)
            elif str(message) not in messages:
                messages.append(str(message))

        warnings.showwarning = collect
        yield messages


def format_plugins(registries: Registries, width: int = 110) -> str:
    """The ``detkit list plugins`` table: each plugin with its distribution and what it registered, or why
    it was skipped."""
    records = list(registries.plugins.values())
    counts = {s: sum(r.status == s for r in records) for s in ("loaded", "failed", "disabled")}
    conflicts = {(kind, name): plugins for kind in registries.kinds
                 for name, plugins in registries.kind(kind).conflicts().items()}
    lines = [f"plugins ({counts['loaded']} loaded, {counts['failed']} failed, {counts['disabled']} disabled):"]
    for r in records:
        lines.append(f"  {r.name:<12} {r.origin}")
        if r.status == "failed":
            body = [f"FAILED, skipped: {r.error}"]
        elif r.status == "disabled":
            body = [f"disabled ({DISABLE_PLUGINS_ENV})"]
        else:
            body = [f"{kind}: " + ", ".join(
                n + (f" (also registered by {', '.join(repr(p) for p in conflicts[kind, n] if p != r.name)}: "
                     f"asking for it is an error)" if (kind, n) in conflicts else "") for n in names)
                for kind, names in r.registered.items()] or ["registered nothing"]
        for text in body:
            lines.append(textwrap.fill(text, width, initial_indent=" " * 6, subsequent_indent=" " * 8,
                                       break_long_words=False, break_on_hyphens=False))
    lines += [f"note: {note}" for note in registries.notes]
    return "\n".join(lines) + "\n"
