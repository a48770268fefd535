"""What the registry layer reports: the records of loaded plugins, its errors and warnings."""
from __future__ import annotations

import importlib
import os
import traceback
import warnings
from dataclasses import dataclass, field

#: the environment variable that disables plugins by name (named in messages)
DISABLE_PLUGINS_ENV = "DETKIT_DISABLE_PLUGINS"


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


#: detkit's plugin host, this package and detkit/plugins.py: its frames are not where a plugin's error is
_HOST = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
         os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins.py"))


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line being the innermost frame in a source file."""
    machinery = ("<", os.path.dirname(importlib.__file__) + os.sep)  # frozen importlib, importlib/*.py
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(machinery) and not f.filename.startswith(_HOST)]  # (a path or a prefix)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = ""  # its message names the file and line
    return f"{type(exc).__name__}: {exc}{where}"
