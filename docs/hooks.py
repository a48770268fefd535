"""MkDocs hook (mkdocs.yml ``hooks:``): the config reference, generated at build time from the code so that it
cannot drift from it.

A page that holds the line ``<!-- detkit:config-reference -->`` gets it replaced by tables of every key: the
config dataclasses of :mod:`detkit.config.schema` (``Config`` and ``ClassifierConfig``) and the settings
dataclass of every part the loaded plugins register (``detkit.plugins.get_registries()``), with each key's
type, default, ``ranged(...)`` bounds and meaning. The meaning is the class docstring and the comments written
beside (or just above) each field in the source, which Python does not keep, so they are read from the source
text. A plugin that fails to load is a warning, which ``mkdocs build --strict`` turns into a failed build.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import logging
import os
import re
import textwrap
import tokenize
from typing import Any

MARKER = "<!-- detkit:config-reference -->"
log = logging.getLogger("mkdocs.hooks.detkit")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())


# ----------------------------------------------------------------------------- reading a dataclass


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines just above its line and the comment at the end of it, joined (fields a
    dataclass inherits: from the class that declares them)."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update({k: v for k, v in _own_field_comments(base).items() if v or k not in comments})
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT
                and lines[tok.start[0] - 1].split("#")[0].strip()}
    comments: dict[str, str] = {}
    body = ast.parse(source).body[0].body
    for stmt in body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, n = [], stmt.lineno - 2
        while n >= 0 and lines[n].strip().startswith("#"):
            above.insert(0, lines[n].strip().lstrip("#").strip())
            n -= 1
        text = " ".join(above + [trailing.get(stmt.end_lineno, trailing.get(stmt.lineno, ""))]).strip()
        comments[stmt.target.id] = text
    return comments


def plain(doc: str | None) -> str:
    """A docstring as one Markdown paragraph: Sphinx roles and double backticks become code spans."""
    if not doc:
        return ""
    text = " ".join(inspect.cleandoc(doc).split())
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def yaml_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def also(meaning: str, more: str) -> str:
    """``meaning`` followed by the sentence ``more``."""
    if not meaning:
        return more
    return meaning + ("" if meaning.endswith(".") else ".") + " " + more


def cell(text: str) -> str:
    """``text`` fit for a table cell: pipes escaped outside code spans (Python-Markdown's tables leave a pipe
    inside backticks alone, and would show the backslash there)."""
    parts = re.split(r"(`[^`]*`)", text.replace("\n", " "))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def code(text: str) -> str:
    return f"`{text}`" if text else ""


def anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def dataclass_tables(cls: type, path: str, level: int, intro: str = "", prefix: str = "",
                     heading: str = "") -> list[str]:
    """A heading for ``path`` (``heading`` instead, when given), the class's docstring, a table of its fields,
    then one such section per field that is itself a dataclass (``model.backbone``,
    ``model.proposal_generator.anchors``). ``prefix`` keeps the anchors of two tables of one key apart."""
    from detkit.config import PartConfig

    comments = field_comments(cls)
    out = [heading or f"{'#' * level} `{path}` {{#{anchor(prefix + ' ' + path)}}}", ""]
    doc = plain(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
    for text in (intro, doc, f"Settings class: `{cls.__module__}.{cls.__qualname__}`."):
        out += [text, ""] if text else []
    out += ["| key | type | default | range | meaning |", "| --- | --- | --- | --- | --- |"]
    nested = []
    for f in dataclasses.fields(cls):
        value = default_of(f)
        meaning = comments.get(f.name, "")
        key = f"{path}.{f.name}" if path else f.name
        if isinstance(value, PartConfig):
            shown = f"{{name: {value.name}}}"
            meaning = also(meaning, f"A part section: see [`{key}`](#{anchor(key.split('.')[-1])}).")
        elif dataclasses.is_dataclass(value):
            shown = ""
            nested.append((type(value), key))
            meaning = also(meaning, f"See [`{key}`](#{anchor(prefix + ' ' + key)}).")
        else:
            shown = yaml_text(value)
        if f.metadata.get("open"):
            meaning = also(meaning, "Not a key of its own: the sections `model.<slot>` of the slots the "
                                    "detector declares ([below](#detector)).")
        rng = f.metadata.get("range")
        limits = "" if rng is None or str(rng) == "finite" else str(rng)
        if f.metadata.get("nonempty"):
            limits = (limits + ", " if limits else "") + "non-empty"
        ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(f"| `{f.name}` | {cell(code(ftype))} | {cell(code(shown))} | {cell(limits)} | {cell(meaning)} |")
    out.append("")
    for sub, key in nested:
        out += dataclass_tables(sub, key, min(level + 1, 5), prefix=prefix)
    return out


# ----------------------------------------------------------------------------- the registered parts


#: where a kind of part is configured (anything else is ``model.<key>``)
SECTION = {"backbone": "model.backbone", "detector": "model.detector", "schedule": "train.schedule",
           "dataset": "data.train / data.test / data.val",
           "classification_dataset": "data.train / data.test (detkit pretrain)", "logger": "train.loggers[i]"}


def describe(entry) -> str:
    facts = [f"Plugin `{entry.plugin}`"]
    for key, value in entry.info.items():
        if key in ("slots", "from_path") or callable(value):
            continue
        facts.append(f"{key}: {value}" if key in ("paper", "format", "path_form", "family") else f"`{key}={value!r}`")
    return "; ".join(facts)


def builder_keys(builder, skip=("num_classes", "transform", "build_dataset", "settings", "context")) -> str:
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return ""
    keys = []
    for p in params:
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        keys.append(f"`{p.name}`" + (f" = `{yaml_text(p.default)}`" if p.default is not p.empty else " (required)"))
    return ", ".join(keys)


def parts_markdown(registries) -> list[str]:
    out = ["## Parts and their settings {#parts}", "",
           "Every part a config chooses by `name:` comes from a plugin. A part registered with a settings class "
           "takes that class's fields as the keys of its section, besides `name`; a part without one takes no "
           "keys. The plugins loaded when this page was built:",
           ", ".join(f"`{name}` ({r.origin})" for name, r in registries.plugins.items() if r.status == "loaded")
           + ".", ""]
    slot_sections: dict[type, list[str]] = {}
    for kind in registries.part_kinds.values():
        registry = registries.kind(kind.plural)
        section = SECTION.get(kind.key, f"model.{kind.key}")
        out += [f"### `{section}`: {kind.plural.replace('_', ' ')} {{#{anchor(kind.key)}}}", ""]
        out += [f"`detkit list {kind.plural}` lists them; plugins register them with the "
                f"`{kind.hook}` hook ([Plugins](plugins.md)).", ""]
        if kind.key in ("backbone", "dataset", "classification_dataset"):
            what = "options (`model.backbone.args`)" if kind.key == "backbone" else "keys"
            out += [f"| name | plugin and facts | {what} |", "| --- | --- | --- |"]
            for e in registry.entries():
                out.append(f"| `{e.name}` | {cell(describe(e))} | {cell(builder_keys(e.builder))} |")
            out.append("")
            continue
        for e in registry.entries():
            path = f"{section}: {e.name}"
            if e.settings is not None and dataclasses.fields(e.settings):
                out += dataclass_tables(e.settings, section, 4, prefix=e.name,
                                        intro=f"{describe(e)}. In a config: `{section}: {{name: {e.name}, ...}}`.",
                                        heading=f"#### `{e.name}` {{#{anchor(path)}}}")
            else:
                out += [f"#### `{e.name}` {{#{anchor(path)}}}", "", f"{describe(e)}. Takes no keys besides `name`.", ""]
            slots = e.info.get("slots", ())
            if slots:
                out += ["Slots (the sections `model.<key>` this detector takes):", "",
                        "| key | holds | default | accepts | about |", "| --- | --- | --- | --- | --- |"]
                for s in slots:
                    if s.kind is None:
                        holds = f"settings `{s.settings.__name__}` ([below](#{anchor('model.' + s.key + ' ' + s.settings.__name__)}))"
                        slot_sections.setdefault(s.settings, []).append(e.name)
                    else:
                        holds = f"part: [{s.kind}](#{anchor(s.kind)})"
                    default = "" if s.kind is None else code(s.default) if s.default else "none (optional)"
                    accepts = ", ".join(code(c) for c in s.choices) or ("any" if s.kind else "")
                    out.append(f"| `{s.key}` | {holds} | {default} | {accepts} | {cell(s.doc)} |")
                out.append("")
    if slot_sections:
        out += ["### Settings sections of the detectors {#detector-settings}", "",
                "A detector may declare a slot that holds settings of its own rather than a part: "
                "`model.roi_heads` of the two-stage detectors.", ""]
        for cls, detectors in slot_sections.items():
            key = next(s.key for e in registries.detectors.entries() for s in e.info.get("slots", ())
                       if s.settings is cls)
            out += dataclass_tables(
                cls, f"model.{key}", 4, prefix=cls.__name__,
                intro="Detectors: " + ", ".join(code(d) for d in detectors) + ".",
                heading=f"#### `model.{key}` of {', '.join(code(d) for d in detectors)} "
                        f"{{#{anchor('model.' + key + ' ' + cls.__name__)}}}")
    return out


def reference_markdown() -> str:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import warnings

    from detkit.config import CONFIG_VERSION, ClassifierConfig, Config
    from detkit.plugins import get_registries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registries = get_registries()
    for w in caught:
        log.warning("config reference: %s", w.message)
    for name, error in registries.load_errors.items():
        log.warning("config reference: plugin %r failed to load: %s", name, error)
    out = [f"Generated from the code when this site was built (config layout `version: {CONFIG_VERSION}`). "
           "Types are as the dataclasses declare them; a range is checked when a config is loaded (a file, a "
           "`--set`, or a checkpoint's embedded config); `null` is YAML's None.", "",
           "## Detector configs: `detkit train`, `eval`, `infer` {#config}", ""]
    out += dataclass_tables(Config, "", 2, intro="The top level of a detector config (`detkit.config.Config`).")[2:]
    out += ["## Pretraining configs: `detkit pretrain` {#classifier-config}", "",
            "A backbone trained as a classifier (`detkit.config.ClassifierConfig`; see [Pretraining](pretraining.md)).", ""]
    out += dataclass_tables(ClassifierConfig, "", 2, prefix="pretrain")[2:]
    out += parts_markdown(registries)
    return "\n".join(out) + "\n"
