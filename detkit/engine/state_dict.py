"""Reading tensors from local torch files, for checkpoints, pretrained backbones and imported detection
weights; nothing is downloaded.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so nothing in a
file can run code. When a file cannot be read so, the error says what the file is not (empty, text, another
program's archive, a pickle asking for a function or class) instead of passing torch's advice on.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any

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
