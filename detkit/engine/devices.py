"""The device and the numeric precision a run uses, from ``train.device`` and ``train.amp``."""
from __future__ import annotations

import contextlib

import torch

from detkit.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; CUDA must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine")
    return device


def autocast(device: torch.device, amp: str):
    """The mixed-precision context of ``train.amp`` (none | bf16 | fp16) on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ConfigError(f"train.amp={amp!r}: expected none, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtypes[amp])
