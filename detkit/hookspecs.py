"""The hooks a detkit plugin may implement: one per kind of part, made from the table of kinds
(:data:`detkit.registry.kinds.KINDS`), whose entries document each hook.

A hook receives a ``register`` callback and calls it once per part it provides::

    register(name: str, builder: Callable, settings: type | None = None, **info)

A model part (neck, proposal generator, RoI extractor, box head, box predictor, detector) and a schedule own
their settings: ``settings`` is a dataclass whose fields are the keys of the part's config section
(``model.roi_extractor: {name: my_pool, bins: 5}``), validated against it (an unknown key gets the closest
valid one, a wrong type names the expected type). The builder is called as ``builder(settings, context)``
with the instance and the kind's typed build context (:mod:`detkit.registry.contexts`). Backbones and
datasets take their keys as builder keyword arguments (``model.backbone.args``, ``data.train``). ``info`` is
metadata shown by ``detkit list`` (``family="resnet"``, ``paper=...``) and declarations the host reads: a part
whose training needs a schedule of its own declares it (``schedule="svm_posthoc"``), a detector declares its
slots (``slots=[Slot(...), ...]``), an RoI extractor what it consumes and produces.

The host owns the names: a plugin's hooks are called, its registrations checked as a whole, and a plugin that
fails (its hook raises, registers an invalid part or a name twice, or a name a built-in plugin provides; a
hook function whose name matches no hook, or a ``detkit_register_*`` function without ``@hookimpl``) is
skipped with none of its parts kept and reported by name with the reason (``detkit list plugins``). A name
two third-party plugins register is an error, naming both, for the command that asks for it.

A third-party plugin is an importable module with ``@hookimpl`` functions and one
``[project.entry-points.detkit]`` line in its package metadata. Hooks of earlier releases
(``detkit_register_heads``) still work for one release, with a deprecation warning naming the new one.
"""
from __future__ import annotations

import pluggy

from detkit.registry.kinds import KINDS, PartKind

hookspec = pluggy.HookspecMarker("detkit")
hookimpl = pluggy.HookimplMarker("detkit")


def make_hookspec(kind: PartKind, name: str):
    """The hook specification of ``kind`` under ``name`` (its hook, or a deprecated name of it)."""

    def hook(register):
        pass

    hook.__name__ = hook.__qualname__ = name
    hook.__module__ = __name__
    if name == kind.hook:
        hook.__doc__ = f"Register {kind.plural.replace('_', ' ')}. " + " ".join(kind.doc.split())
        return hookspec(hook)
    hook.__doc__ = f"Deprecated name of :func:`{kind.hook}` (kept for one release)."
    return hookspec(warn_on_impl=DeprecationWarning(f"hook {name} is deprecated: implement {kind.hook}"))(hook)


for _kind in KINDS:
    for _name in (_kind.hook, *_kind.legacy_hooks):
        globals()[_name] = make_hookspec(_kind, _name)
del _kind, _name


@hookspec
def detkit_register_part_kinds(register):
    """Declare new kinds of part: ``register(PartKind(key, plural, doc, context, schedules))``
    (:class:`detkit.registry.kinds.PartKind`; ``context`` a frozen dataclass subclassing
    :class:`detkit.registry.contexts.BuildContext`). Each kind gets its hook, ``detkit_register_<plural>``, which
    any plugin may then implement, a registry (``detkit list <plural>``) and config sections wherever a detector
    declares a :class:`~detkit.registry.kinds.Slot` of it; its parts are built by the detector with
    ``context.build(slot_key, YourContext(...))``. Declared kinds are read before any plugin's hooks are checked,
    so the order plugins load in does not matter. A word already used by a kind is refused."""
