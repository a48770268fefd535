"""The vocabulary every config module shares: the error, ranged fields, part sections, merging."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Invalid configuration: the message names the file and key path."""


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts: a finite number within the given bounds (``ge``/``gt`` below,
    ``le``/``lt`` above). A list is checked element by element; None (an optional key left unset) is not
    checked."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        finite = isinstance(value, int) or math.isfinite(value)  # (an int may be too large for math.isfinite)
        return (finite and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        lo, hi = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        up, close = (self.le, "]") if self.le is not None else (self.lt, ")")
        if lo is not None and up is not None:
            return f"in {hi}{lo:g}, {up:g}{close}"
        if lo is not None:
            return f"{'>=' if hi == '[' else '>'} {lo:g}"
        return f"{'<=' if close == ']' else '<'} {up:g}" if up is not None else "finite"


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           nonempty: bool = False) -> Any:
    """A dataclass field whose value the config loader checks against a :class:`Range` (a part's settings
    class uses it too): ``lr: float = ranged(0.001, gt=0)``, ``positive_fraction: float = ranged(0.5, ge=0, le=1)``.
    A value outside fails with the key, the value and the range; ``nonempty``: a list value needs an element."""
    return field(default=default, default_factory=default_factory,
                 metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt), "nonempty": nonempty})


@dataclass
class PartConfig:
    """A registered part chosen by name, with that part's own settings.

    In a file the section is ``{name: roi_align, sampling_ratio: 2}`` (a bare string ``roi_align`` is
    ``{name: roi_align}``). Before the config is bound to the plugin registries (:func:`bind_parts`),
    ``settings`` holds the given keys as a mapping; after, an instance of the settings dataclass the part was
    registered with, every default filled in.
    """

    name: str
    settings: Any = field(default_factory=dict)

    @property
    def bound(self) -> bool:
        return dataclasses.is_dataclass(self.settings)


@dataclass
class NoSettings:
    """The settings of a part registered without a settings class: it takes no config keys."""


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        # A part given by its name alone is the mapping {name: ...}: the same name keeps the base's settings.
        if isinstance(value, str) and isinstance(old, dict) and old.get("name") == value:
            value = {"name": value}
        if isinstance(old, str) and isinstance(value, dict) and value.get("name", old) == old:
            old = out[key] = {"name": old}
        # A part that names another registered component replaces the base's part instead of merging
        # into it (its keys belong to another builder).
        swapped = isinstance(value, dict) and isinstance(old, dict) and "name" in value and value.get("name") != old.get("name")
        if isinstance(value, dict) and isinstance(old, dict) and not swapped:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def as_part(value: Any) -> dict:
    return {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else {}
