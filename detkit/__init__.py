"""detkit: plugin-based two-stage object detection (R-CNN, SPP-net, Fast R-CNN, Faster R-CNN).

The Python API (:mod:`detkit.api`) is importable from here: ``from detkit import Detector``; ``detkit.train``,
``detkit.evaluate``, ``detkit.load_config``, ``detkit.list_parts``. It is loaded on first use, so that
``import detkit`` and the command line's start stay light.
"""
__version__ = "0.1.0"

_API = ("Detections", "Detector", "PartInfo", "evaluate", "list_parts", "load_config", "train")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from detkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
