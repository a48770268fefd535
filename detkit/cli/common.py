"""What the command modules share: the registries (skipped plugins reported once), the device, ``--set`` and the
options of the commands that run a model or train (``--device``, ``--no-progress``), ranged numbers, renamed options
kept as hidden deprecated aliases, and ``--data`` given as a dataset path or a YAML mapping."""
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


def dims(count: int, sep: str, *, ge: int, example: str):
    """An argparse ``type=`` for sizes written as ``count`` integers joined by ``sep`` (``240x320``, ``3,224,224``),
    each at least ``ge``: the tuple of them, or a usage error (exit 2) naming the option, the value and the form."""
    letters = {2: "HEIGHTxWIDTH", 3: "C,H,W"}.get(count, sep.join(["N"] * count))

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.lower().split(sep))
        except ValueError:
            values = ()
        if len(values) != count or min(values) < ge:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {letters} with each at least {ge}, e.g. {example}")
        return values

    parse.__name__ = "size"
    return parse


DEVICE_FORMS = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"


def device_name(text: str) -> str:
    """An argparse ``type=`` for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (CUDA must exist here); a
    usage error (exit 2) naming the option and the value otherwise. Returns the name as given."""
    import re

    if text in ("auto", "cpu"):
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {DEVICE_FORMS}")
    import torch

    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use cpu or auto)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


class DeprecatedAlias(argparse.Action):
    """A renamed option's old name: hidden from ``--help``, stores into the new option's ``dest`` and prints one
    line on stderr naming the new option."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_output(p: argparse.ArgumentParser, help: str, *, required: bool = False, old: str | None = None,
                **kwargs) -> None:
    """``--output`` (where a command writes), with ``old``, an earlier name of it, as a hidden deprecated alias (one
    of the two is required when ``required``)."""
    group = p.add_mutually_exclusive_group(required=required) if old else p
    group.add_argument("--output", required=required and not old, help=help, **kwargs)
    if old:
        group.add_argument(old, dest="output", action=DeprecatedAlias, new="--output", metavar="OUTPUT")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")


def _add_no_progress(p: argparse.ArgumentParser, help: str = "no progress bars (for logs and scripts)") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def _add_device(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--device", type=device_name, metavar="DEVICE",
                   help=help or f"where the model runs: {DEVICE_FORMS} (default: auto)")


def _add_model_run_options(p: argparse.ArgumentParser, device_help: str | None = None) -> None:
    """``--device``, ``--no-progress`` and ``--set``: the options of a command that runs a model."""
    _add_device(p, device_help)
    _add_no_progress(p)
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
    """The dataset ``--data`` names (:func:`detkit.data.loading.dataset_spec`: a path a registered
    format recognises, with ``--images``, ``--split``, ``--classes`` or else ``classes``, a checkpoint's; or a
    mapping)."""
    from detkit.data.loading import dataset_spec

    if not spec:
        return None
    given = [c.strip() for c in (getattr(args, "classes", None) or "").split(",") if c.strip()]
    return dataset_spec(spec, _registries().datasets, getattr(args, "images", None), getattr(args, "split", None),
                        given or (list(classes) if classes else None))
