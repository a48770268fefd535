"""Plugin discovery (pluggy); the registries it fills are :mod:`detkit.registry.registries`, re-exported here
with the errors and records of :mod:`detkit.registry.records` (``from detkit.plugins import get_registries``).

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
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import os
import textwrap
import warnings
from typing import Any, Callable, Iterable, Iterator

import pluggy

from detkit import hookspecs
from detkit.registry.contexts import BuildContext
from detkit.registry.kinds import BY_HOOK, KINDS as PART_KINDS, PartKind
from detkit.registry.records import (DISABLE_PLUGINS_ENV, NameConflictError, PluginError,  # noqa: F401
                                     PluginRecord, PluginWarning, UnknownNameError, describe_exception)
from detkit.registry.registries import (Entry, Registries, Registry, registration_problem)  # noqa: F401

ENTRY_POINT_GROUP = "detkit"
DISABLE_ENV = "DETKIT_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_ENV = "DETKIT_PLUGINS"
#: the distribution whose entry points are the built-in plugins
BUILTIN_DISTRIBUTION = "detkit"

#: hook name -> registry kind (the word used by ``detkit list KIND``), derived from the table of kinds; the
#: deprecated hook names included
KINDS = {hook: kind.plural for hook, kind in BY_HOOK.items()}


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


def _import(record: PluginRecord, load: Callable[[], Any], records: dict[str, PluginRecord],
            imported: list[tuple[PluginRecord, Any]]) -> None:
    """Import one plugin into ``imported``; one that cannot be is recorded as failed."""
    taken = records.get(record.name)
    key = record.name if taken is None else f"{record.name} ({record.origin})"
    records[key] = record
    try:
        plugin = load()
    except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) must not take the others down
        record.fail(describe_exception(exc))
        return
    if any(plugin is other for _, other in imported):  # the same module twice (an entry point and DETKIT_PLUGINS)
        del records[key]
        return
    if taken is not None:
        record.fail(f"another plugin is named {record.name!r} ({taken.origin}); rename this entry point")
        return
    imported.append((record, plugin))


def _declare_kinds(pm: pluggy.PluginManager, record: PluginRecord, plugin: Any) -> None:
    """The kinds of part ``plugin`` declares (its ``detkit_register_part_kinds`` hook), added to the manager's
    table with their hooks, before any plugin's hooks are checked, so that every plugin may implement them."""
    if pm.parse_hookimpl_opts(plugin, "detkit_register_part_kinds") is None:
        return
    declared: list = []
    try:
        plugin.detkit_register_part_kinds(register=declared.append)
    except (Exception, SystemExit) as exc:  # the plugin's bug: skip it
        record.fail(f"its hook detkit_register_part_kinds raised {describe_exception(exc)}")
        return
    taken = {name for k in pm.detkit_kinds for name in (k.key, k.plural, *k.legacy_plurals)}
    problems = [p for p in (part_kind_problem(kind, taken) for kind in declared) if p]
    if problems:
        record.fail("; ".join(problems))
        return
    for kind in declared:
        pm.add_hookspecs(type(f"{kind.key}_hooks", (), {kind.hook: hookspecs.make_hookspec(kind, kind.hook)}))
        pm.detkit_kinds.append(kind)
        taken |= {kind.key, kind.plural}


def part_kind_problem(kind: Any, taken: set[str]) -> str | None:
    """Why a kind a plugin declares is invalid, or None (``taken``: the words the table already uses)."""
    if not isinstance(kind, PartKind):
        return f"declared a part kind {kind!r}: expected a detkit.registry.kinds.PartKind"
    for word in (kind.key, kind.plural):
        if not word.isidentifier():
            return f"declared part kind {kind.key!r} with {word!r}, which is not an identifier"
        if word in taken:
            return f"declared part kind {kind.key!r}, but {word!r} is already a kind of part"
    if kind.context is not None and not (isinstance(kind.context, type) and issubclass(kind.context, BuildContext)
                                         and dataclasses.is_dataclass(kind.context)):
        return (f"declared part kind {kind.key!r} with context {kind.context!r}: expected a dataclass subclassing "
                f"detkit.registry.contexts.BuildContext")
    return None


def _register(pm: pluggy.PluginManager, record: PluginRecord, plugin: Any) -> None:
    """Register one imported plugin's hooks; one whose hooks are wrong is recorded as failed."""
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
    imported: list[tuple[PluginRecord, Any]] = []
    for record, load, entry_point in candidates:
        if entry_point and not autoload:
            continue
        if record.name in disabled:
            record.status = "disabled"
            records.setdefault(record.name, record)
        else:
            _import(record, load, records, imported)
    pm.detkit_kinds = list(PART_KINDS)  # the table, and below the kinds plugins declare
    for record, plugin in imported:
        _declare_kinds(pm, record, plugin)
    for record, plugin in imported:
        if record.status == "loaded":
            _register(pm, record, plugin)
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
