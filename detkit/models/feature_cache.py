"""On-disk, memory-mapped store of region features, larger than RAM (R-CNN Sec. 2.3, Appendix B).

R-CNN trains its SVMs and box regressor on features of every ground-truth box and every
proposal of the training set, cached on disk once after fine-tuning (about 2000 regions
per image: far more than memory for VOC). This module writes such a cache one image at a
time and reads it back as ``np.memmap`` arrays, so training reads it chunk by chunk.

Layout of a cache directory::

    meta.json            version, fingerprint, row count, feature dims and dtype, per-array
                         dtypes and widths, each feature's mean L2 norm
    feat_<name>.bin      raw C-order rows (num_rows, dims[name]) in the cache dtype
    <array>.bin          raw per-row metadata: boxes (n, 4) f32, gt_label (n,) i64,
                         overlaps (n, K) f32, matched_gt (n, 4) f32, matched_label (n,) i64,
                         matched_iou (n,) f32
    images.npz           image_index, row_start, row_stop: which rows each image owns

Every per-row array is streamed to its file as it is appended (files opened in append
mode), so writing holds one image in memory, not the cache. Everything is written into
``path + ".partial"`` and the directory is renamed to ``path`` only by ``close()``, after
``meta.json`` is written: an interrupted run leaves at most a ``.partial`` directory,
which the next ``create`` deletes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from detkit.engine.files import replace_directory, write_json_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_META = "meta.json"
_IMAGES = "images.npz"
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class FeatureCacheError(ValueError):
    """A feature cache that is missing, incomplete, or was made for other settings."""


def _row_arrays(num_classes: int) -> dict[str, tuple[str, int]]:
    """Per-row metadata arrays: name -> (dtype, width); width 0 means a 1-d array."""
    return {
        "boxes": ("float32", 4),
        "gt_label": ("int64", 0),
        "overlaps": ("float32", num_classes),
        "matched_gt": ("float32", 4),
        "matched_label": ("int64", 0),
        "matched_iou": ("float32", 0),
    }


class FeatureCacheWriter:
    """Streams rows into ``path + ".partial"``; ``close()`` publishes the cache at ``path``.

    Use as a context manager: an exception inside the ``with`` block deletes the partial
    directory instead of publishing it.
    """

    def __init__(self, path: str | os.PathLike, dims: dict[str, int], dtype: str, num_classes: int,
                 fingerprint: str, overwrite: bool):
        if dtype not in ("float32", "float16"):
            raise FeatureCacheError(f"{path}: feature dtype must be 'float32' or 'float16', got {dtype!r}")
        for name, dim in dims.items():
            if not _NAME.match(name):
                raise FeatureCacheError(f"{path}: feature name {name!r} must be letters, digits and '_'")
            if int(dim) <= 0:
                raise FeatureCacheError(f"{path}: dims[{name!r}] must be positive, got {dim}")
        if num_classes <= 0:
            raise FeatureCacheError(f"{path}: num_classes must be positive, got {num_classes}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FeatureCacheError(f"{self.path}: a feature cache already exists (pass overwrite=True to replace it)")
        self.partial = Path(str(self.path) + ".partial")
        if self.partial.exists():
            log.warning("%s: deleting an incomplete feature cache left by an interrupted run", self.partial)
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.dims = {k: int(v) for k, v in dims.items()}
        self.dtype = np.dtype(dtype)
        self.num_classes = int(num_classes)
        self.fingerprint = fingerprint
        self.arrays = _row_arrays(self.num_classes)
        self.num_rows = 0
        self._norm_sum = {k: 0.0 for k in self.dims}
        self._images: dict[int, list[int]] = {}  # image index -> [row_start, row_stop]
        self._last_image: int | None = None
        self._files = {f"feat_{k}": open(self.partial / f"feat_{k}.bin", "ab") for k in self.dims}
        self._files.update({k: open(self.partial / f"{k}.bin", "ab") for k in self.arrays})
        self.closed = False

    def append(self, image_index: int, features: dict[str, np.ndarray], boxes: np.ndarray, gt_label: np.ndarray,
               overlaps: np.ndarray, matched_gt: np.ndarray, matched_label: np.ndarray,
               matched_iou: np.ndarray) -> None:
        """Append ``n`` regions of image ``image_index``.

        features: ``{name: (n, dims[name])}``; boxes ``(n, 4)`` xyxy; gt_label ``(n,)`` the class of the
        ground truth the region *is* (0 for proposals); overlaps ``(n, K)`` max IoU with the ground truth of
        each class; matched_gt ``(n, 4)``, matched_label ``(n,)``, matched_iou ``(n,)``: the ground truth of
        highest IoU (any class). An image may be appended in several calls, but they must be consecutive.
        n = 0 registers the image with no rows.
        """
        if self.closed:
            raise FeatureCacheError(f"{self.partial}: append() after close()")
        image_index = int(image_index)
        if image_index != self._last_image and image_index in self._images:
            raise FeatureCacheError(f"{self.partial}: image {image_index} was appended before another image; "
                                    "an image's rows must be appended consecutively")
        if set(features) != set(self.dims):
            raise FeatureCacheError(f"{self.partial}: image {image_index}: features have keys {sorted(features)}, "
                                    f"the cache was created with {sorted(self.dims)}")
        n = len(boxes)
        rows = {"boxes": boxes, "gt_label": gt_label, "overlaps": overlaps, "matched_gt": matched_gt,
                "matched_label": matched_label, "matched_iou": matched_iou}
        checked = {}
        for name, (dtype, width) in self.arrays.items():
            arr = np.ascontiguousarray(np.asarray(rows[name]), dtype=dtype)
            shape = (n, width) if width else (n,)
            if arr.shape != shape:
                raise FeatureCacheError(f"{self.partial}: image {image_index}: {name} has shape {arr.shape}, "
                                        f"expected {shape}")
            checked[name] = arr
        feats = {}
        for name, dim in self.dims.items():
            arr = np.asarray(features[name])
            if arr.shape != (n, dim):
                raise FeatureCacheError(f"{self.partial}: image {image_index}: features[{name!r}] has shape "
                                        f"{arr.shape}, expected {(n, dim)}")
            feats[name] = np.ascontiguousarray(arr, dtype=self.dtype)
        for name, arr in checked.items():
            self._files[name].write(arr.data)
        for name, arr in feats.items():
            self._files[f"feat_{name}"].write(arr.data)
            self._norm_sum[name] += float(np.linalg.norm(arr.astype(np.float32), axis=1).sum())
        span = self._images.setdefault(image_index, [self.num_rows, self.num_rows])
        self.num_rows += n
        span[1] = self.num_rows
        self._last_image = image_index

    def close(self) -> None:
        """Write ``images.npz`` and ``meta.json`` and rename the directory to ``path``."""
        if self.closed:
            return
        for f in self._files.values():
            f.close()
        order = sorted(self._images)
        np.savez(self.partial / _IMAGES, image_index=np.asarray(order, np.int64),
                 row_start=np.asarray([self._images[i][0] for i in order], np.int64),
                 row_stop=np.asarray([self._images[i][1] for i in order], np.int64))
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "num_rows": self.num_rows,
            "num_classes": self.num_classes,
            "dtype": self.dtype.name,
            "dims": self.dims,
            "arrays": {k: list(v) for k, v in self.arrays.items()},
            "mean_norm": {k: s / max(1, self.num_rows) for k, s in self._norm_sum.items()},
        }
        # meta.json is written last and atomically: a directory with it is complete.
        write_json_atomic(self.partial / _META, meta, indent=1)
        replace_directory(self.partial, self.path)
        self.closed = True

    def abort(self) -> None:
        """Close the files and delete the partial directory."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.partial, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> "FeatureCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:
            self.abort()


class FeatureCache:
    """Read side of a feature cache: memory-mapped features and per-row metadata.

    ``features(name) -> np.memmap (num_rows, dims[name])``; metadata arrays are attributes
    (``boxes (N, 4)``, ``gt_label (N,)``, ``overlaps (N, K)``, ``matched_gt (N, 4)``,
    ``matched_label (N,)``, ``matched_iou (N,)``), memory-mapped as well.
    """

    boxes: np.ndarray
    gt_label: np.ndarray
    overlaps: np.ndarray
    matched_gt: np.ndarray
    matched_label: np.ndarray
    matched_iou: np.ndarray

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.num_rows: int = int(meta["num_rows"])
        self.num_classes: int = int(meta["num_classes"])
        self.dims: dict[str, int] = {k: int(v) for k, v in meta["dims"].items()}
        self.dtype = np.dtype(meta["dtype"])
        self.fingerprint: str = meta["fingerprint"]
        for name, (dtype, width) in meta["arrays"].items():
            setattr(self, name, self._map(path / f"{name}.bin", np.dtype(dtype), width))
        self._features = {k: self._map(path / f"feat_{k}.bin", self.dtype, d) for k, d in self.dims.items()}
        with np.load(path / _IMAGES) as z:
            self._spans = {int(i): (int(a), int(b)) for i, a, b in zip(z["image_index"], z["row_start"], z["row_stop"])}

    @staticmethod
    def create(path: str | os.PathLike, dims: dict[str, int], dtype: str = "float32", num_classes: int = 1,
               fingerprint: str = "", overwrite: bool = False) -> FeatureCacheWriter:
        """A writer into ``path + ".partial"``; see :class:`FeatureCacheWriter`."""
        return FeatureCacheWriter(path, dims, dtype, num_classes, fingerprint, overwrite)

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: str | None = None) -> "FeatureCache":
        """Open a complete cache; ``fingerprint``, when given, must equal the one it was written with."""
        path = Path(path)
        meta_file = path / _META
        if not meta_file.is_file():
            raise FeatureCacheError(f"{path}: not a complete feature cache (no {_META})")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise FeatureCacheError(f"{meta_file}: unreadable ({e})") from e
        if meta.get("version") != CACHE_VERSION:
            raise FeatureCacheError(f"{meta_file}: field 'version' is {meta.get('version')!r}, this detkit reads "
                                    f"version {CACHE_VERSION}; delete the cache to rebuild it")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise FeatureCacheError(f"{meta_file}: field 'fingerprint' is {meta.get('fingerprint')!r}, expected "
                                    f"{fingerprint!r} (the cache was made with other settings)")
        return cls(path, meta)

    @classmethod
    def exists(cls, path: str | os.PathLike, fingerprint: str | None = None) -> bool:
        """Whether a complete, readable cache of this version (and fingerprint) is at ``path``."""
        try:
            cls.open(path, fingerprint)
        except FeatureCacheError:
            return False
        return True

    def _map(self, file: Path, dtype: np.dtype, width: int) -> np.ndarray:
        shape = (self.num_rows, width) if width else (self.num_rows,)
        expected = int(np.prod(shape)) * dtype.itemsize
        size = file.stat().st_size if file.is_file() else -1
        if size != expected:
            raise FeatureCacheError(f"{file}: {size} bytes, expected {expected} for {shape} {dtype.name}")
        if self.num_rows == 0:  # mmap cannot map an empty file
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", shape=shape)

    def features(self, name: str) -> np.ndarray:
        """Memory-mapped ``(num_rows, dims[name])`` features."""
        if name not in self._features:
            raise FeatureCacheError(f"{self.path}: no feature {name!r}; the cache has {sorted(self._features)}")
        return self._features[name]

    def mean_norm(self, name: str) -> float:
        """Mean L2 norm of the rows of feature ``name`` (computed while writing)."""
        self.features(name)
        return float(self.meta["mean_norm"][name])

    @property
    def image_indices(self) -> list[int]:
        """The image indices in the cache, ascending."""
        return sorted(self._spans)

    def rows_of_image(self, image_index: int) -> slice:
        """The rows of image ``image_index`` (they are contiguous)."""
        if int(image_index) not in self._spans:
            raise FeatureCacheError(f"{self.path}: image {image_index} is not in the cache")
        return slice(*self._spans[int(image_index)])
