"""Reading a state dict (parameter name -> tensor) from a local file, for pretrained backbones and
imported detection weights; nothing is downloaded."""
from __future__ import annotations

import os

import torch


def read_state_dict(path: str | os.PathLike, what: str = "state dict") -> dict:
    """A state dict (name -> tensor) from a local file, read with ``weights_only``; a ``{"state_dict": ...}``
    or ``{"model": ...}`` wrapper (training scripts' checkpoints) is unwrapped. FileNotFoundError for a
    missing file, ValueError (naming the file) for one that is not a state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise ValueError(f"{path}: not a readable torch state dict ({exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state
