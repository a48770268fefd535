"""What the command modules share: the registries (skipped plugins reported once), the device, ``--set`` and the
options of the commands that run a model, and ``--data``/``--dataset`` given as a dataset path or a YAML mapping."""
from __future__ import annotations

import argparse
import sys


def number(kind: type = float, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None):
    """An argparse ``type=`` for a numeric option: a finite ``kind`` (int or float) within the bounds, as config
    keys are checked (:class:`detkit.config.Range`); anything else is argparse's usage error (exit 2) naming
    the option, the value and the range."""
    from detkit.config import Range

    bounds = Range(ge=ge, gt=gt, le=le, lt=lt)
    word = "integer" if kind is int else "number"
    expected = f"a finite {word}" if str(bounds) == "finite" else f"{'an' if kind is int else 'a'} {word} {bounds}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if not bounds.admits(value):  # NaN and infinities are not finite
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")


def _add_model_run_options(p: argparse.ArgumentParser, device_help: str | None = None) -> None:
    """``--device``, ``--no-progress`` and ``--set``: the options of a command that runs a model."""
    p.add_argument("--device", help=device_help)
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)


def _registries(report: bool = True):
    """The registries; each plugin that was skipped is reported once, as one line (``report``: on stderr)."""
    from detkit.plugins import collected_plugin_warnings, get_registries

    with collected_plugin_warnings() as messages:
        registries = get_registries()
    for message in messages if report else ():
        print(f"warning: {message}", file=sys.stderr)
    return registries


def _device(name: str | None):
    from detkit.engine.devices import resolve_device

    return resolve_device(name or "auto")


def _mapping_argument(text: str, expected: str) -> dict:
    """``--data`` given as a YAML mapping (``{name: ..., ...}``); ConfigError naming what was ``expected``."""
    import yaml

    from detkit.config import ConfigError, safe_load_yaml

    try:
        data = safe_load_yaml(text, "--data")
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"--data {text!r}: expected {expected}")
    return data


def _data_spec(spec: str | None, args, classes: list[str] | None = None) -> dict | None:
    """The dataset ``--data``/``--dataset`` names (:func:`detkit.data.loading.dataset_spec`: a path a registered
    format recognises, with ``--images``, ``--split``, ``--classes`` or else ``classes``, a checkpoint's; or a
    mapping)."""
    from detkit.data.loading import dataset_spec

    if not spec:
        return None
    given = [c.strip() for c in (getattr(args, "classes", None) or "").split(",") if c.strip()]
    return dataset_spec(spec, _registries().datasets, getattr(args, "images", None), getattr(args, "split", None),
                        given or (list(classes) if classes else None))
