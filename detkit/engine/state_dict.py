"""Reading tensors from local torch files, for checkpoints, pretrained backbones and imported detection
weights; nothing is downloaded.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so nothing in a
file can run code. When a file cannot be read so, the error says what the file is not (empty, text, another
program's archive, a pickle asking for a function or class) instead of passing torch's advice on.

A state dict detkit writes for a backbone records its *weights layout* (:func:`record_weights_layout`): the
builder arguments the function of the weights depends on beyond their names and shapes (a ResNet
bottleneck's ``stride_in_1x1``). The record is plain data in torch's own per-module metadata of the state
dict (``state._metadata[""]``, where torch keeps each module's version), not an entry beside the tensors, so
the file loads as before everywhere: ``torch.load(weights_only=True)``, a strict ``load_state_dict`` into
torchvision's model, code that iterates over the tensors.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Any, Mapping

import torch


class WeightsError(ValueError):
    """A weights file that is not a usable state dict, or that fits none of the model; names the file."""


#: how the files torch writes begin: a zip archive (torch.save since 1.6) or a pickle (the legacy format)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


def load_tensors(path: str, what: str, map_location: str | torch.device = "cpu") -> Any:
    """The object a torch file at ``path`` holds, read with ``weights_only=True`` onto ``map_location``.

    ``what`` names what the file should be ("detkit checkpoint", "state dict"). Raises FileNotFoundError for
    a missing file and WeightsError (naming the file, saying plainly what it is not) for anything else.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise WeightsError(f"{path}: not a {what}: the file is empty")
    try:
        with warnings.catch_warnings():  # torch's note on a file's pickle protocol: the message below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and torch errors all mean "not a file torch wrote for us"
        error = exc
    refused = _refused_global(str(error))
    if refused is None and not head.startswith(_ZIP_MAGIC) and head[0] != _PICKLE_PROTOCOL:
        raise WeightsError(f"{path}: not a {what}: not a torch file at all ({_describe_head(head)})")
    if refused is None and not isinstance(error, pickle.UnpicklingError):
        raise WeightsError(f"{path}: not a {what}: torch cannot read it ({_first_line(error)}); a truncated copy "
                           f"or another program's file?")
    asked = refused or f"something torch will not build ({_last_line(str(error))})"
    raise WeightsError(f"{path}: not a {what}: it is a pickle that asks for {asked}, which detkit refuses: it "
                       f"reads tensors and plain containers only and never unpickles arbitrary objects (they "
                       f"could run code); a checkpoint or state dict never needs one")


def _describe_head(head: bytes) -> str:
    text = head[:24].decode("utf-8", errors="replace")
    if all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return f"it begins with the text {text!r}"
    return f"it begins with the bytes {head[:8].hex(' ')}"


def _refused_global(message: str) -> str | None:
    """The global (function or class) a pickle asked for that the weights-only reader refused, if named."""
    found = (re.search(r"GLOBAL (\S+) was not an allowed global", message)
             or re.search(r"unsupported GLOBAL (\S+) whose module", message)
             or re.search(r"reduce for unrecognized function (.+?)(?: which belongs|$)", message, re.M))
    return found.group(1) if found else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _last_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip() and "weights_only" not in ln
             and "add_safe_globals" not in ln and "documentation" not in ln]
    return lines[-1][:200] if lines else "an unsupported pickle instruction"


def read_state_dict(path: str | os.PathLike, what: str = "state dict") -> dict:
    """A state dict (name -> tensor) from a local file, read with ``weights_only``; a ``{"state_dict": ...}``
    or ``{"model": ...}`` wrapper (training scripts' checkpoints) is unwrapped. FileNotFoundError for a
    missing file, WeightsError (a ValueError naming the file) for one that is not a state dict."""
    path = os.fspath(path)
    state = load_tensors(path, what)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a {what} (name -> tensor), got {type(state).__name__}")
    return state


#: the key of the root module's metadata entry under which detkit records a backbone's weights layout
WEIGHTS_LAYOUT_KEY = "detkit_weights_layout"


def record_weights_layout(state: Mapping, layout: Mapping[str, Any]) -> OrderedDict:
    """``state`` (a state dict) with ``layout`` (builder argument -> bool, int, float or str) recorded in its
    metadata; a state dict without metadata (a plain dict) is copied into one that has it."""
    if not all(isinstance(v, (bool, int, float, str)) for v in layout.values()):
        raise TypeError(f"weights layout {dict(layout)!r}: expected plain values (bool, int, float, str)")
    if not isinstance(state, OrderedDict):
        state = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        metadata = state._metadata = OrderedDict()
    metadata[""] = {**metadata.get("", {}), WEIGHTS_LAYOUT_KEY: dict(layout)}
    return state


def recorded_weights_layout(state: Mapping) -> dict | None:
    """The weights layout :func:`record_weights_layout` recorded in ``state``; None when it records none (a file
    written outside detkit, or by a detkit release before the record)."""
    root = (getattr(state, "_metadata", None) or {}).get("", {})
    layout = root.get(WEIGHTS_LAYOUT_KEY) if isinstance(root, Mapping) else None
    return dict(layout) if isinstance(layout, Mapping) else None
