"""Precomputed region proposals cached on disk, one directory per dataset and proposal settings.

R-CNN (Sec. 2.1), SPP-net and Fast R-CNN compute selective search boxes once, offline, and read
them during training and testing; the search costs about a second per image on a CPU core, so the
cache is computed in parallel, written as it goes and resumed after an interruption.

Layout of a cache directory ``<root>/<method>-<fingerprint[:12]>/``:

- ``meta.json``: ``version``, ``method``, ``settings``, ``num_images``, ``fingerprint`` (sha256 over
  the cache version, the method, its settings and the dataset's image list) and ``complete``;
- ``images.json``: the image list the fingerprint covers (``[id, basename, height, width]`` per
  image), so that a mismatch can name the first image that differs;
- ``boxes/{i:08d}.npy``: the proposals of image ``i``, ``(N, 4)`` float32 xyxy in original-image
  pixels, best-ranked first.

Every file is written atomically (a temporary file in the same directory, fsync, ``os.replace``),
so an interrupted run leaves only whole files. A directory whose metadata disagrees with the
dataset or the settings raises ProposalCacheError; it is never used silently.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import time
from typing import Callable

import cv2
import numpy as np

from detkit.data.images import ImageReadError, read_image
from detkit.engine.files import write_bytes_atomic

log = logging.getLogger(__name__)


def default_cache_root() -> str:
    """Where proposal caches go unless a config names a ``cache_dir``: ``$DETKIT_CACHE_DIR/proposals``, else
    ``$XDG_CACHE_HOME/detkit/proposals``, else ``~/.cache/detkit/proposals`` (the XDG base directory rule), so
    a cache is found again from any working directory and is shared by every run on those images."""
    root = os.environ.get("DETKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "detkit")
    return os.path.join(root, "proposals")

CACHE_VERSION = 1
META_FILE = "meta.json"
IMAGES_FILE = "images.json"
BOXES_DIR = "boxes"
_BOX_FILE = re.compile(r"^(\d{8})\.npy$")
_METHOD_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class ProposalCacheError(ValueError):
    """A proposal cache that does not fit the dataset or settings, or a missing or damaged entry; the message
    names the directory and the field or image index."""


# ----------------------------------------------------------------------------- files


def _write_json(path: str, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _canonical_settings(settings: dict) -> dict:
    """Settings as the fingerprint sees them: JSON types, and 0.0 == 0 (so float and int spellings of a
    value name the same cache)."""
    def canon(value, key):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            return int(value) if float(value).is_integer() else float(value)
        if isinstance(value, (list, tuple)):
            return [canon(v, key) for v in value]
        if isinstance(value, dict):
            return {str(k): canon(v, f"{key}.{k}") for k, v in value.items()}
        raise ProposalCacheError(f"proposal settings: {key}={value!r} ({type(value).__name__}) is not a JSON value")

    if not isinstance(settings, dict):
        raise ProposalCacheError(f"proposal settings: expected a mapping, got {type(settings).__name__}")
    return {str(k): canon(v, str(k)) for k, v in settings.items()}


def image_list(dataset) -> list[list]:
    """``[id, basename of file_name, height, width]`` of every image of ``dataset``, in order."""
    out = []
    for i in range(len(dataset)):
        info = dataset.image_info(i)
        image_id = info["id"]
        image_id = int(image_id) if isinstance(image_id, (int, np.integer)) else str(image_id)
        out.append([image_id, os.path.basename(info["file_name"]), int(info["height"]), int(info["width"])])
    return out


def fingerprint(method: str, settings: dict, images: list[list], version: int | None = None) -> str:
    """sha256 (hex) over the cache version (None: CACHE_VERSION), the method, its settings (sorted keys) and
    the image list."""
    version = CACHE_VERSION if version is None else version
    h = hashlib.sha256()
    h.update(json.dumps({"version": version, "method": method, "settings": _canonical_settings(settings)},
                        sort_keys=True).encode("utf-8"))
    h.update(json.dumps(images, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------- the cache


class ProposalCache:
    """Proposals of every image of one dataset, for one method and its settings.

    ``ProposalCache(root, dataset, method, settings)`` opens (or creates) ``<root>/<method>-<fp[:12]>``;
    ``ProposalCache.open(path, dataset)`` opens an explicit directory and checks that it was computed for
    ``dataset``. Boxes: ``get(i) -> (N, 4)`` float32 xyxy original-image pixels.
    """

    def __init__(self, root: str, dataset, method: str, settings: dict):
        if not isinstance(method, str) or not _METHOD_NAME.match(method):
            raise ProposalCacheError(f"proposal method {method!r}: expected a name of letters, digits, '_', '.', "
                                     f"'+' or '-' (it names the cache directory)")
        images = image_list(dataset)
        settings = _canonical_settings(settings)
        fp = fingerprint(method, settings, images)
        expected = {"version": CACHE_VERSION, "method": method, "settings": settings, "num_images": len(images),
                    "fingerprint": fp}
        self._attach(os.path.join(os.fspath(root), f"{method}-{fp[:12]}"), expected, images, create=True)

    @classmethod
    def open(cls, path: str, dataset) -> ProposalCache:
        """An existing cache directory, checked against ``dataset`` (version, number of images, image list)."""
        path = os.fspath(path)
        meta = _read_meta(path)
        images = image_list(dataset)
        expected = {"version": CACHE_VERSION, "method": meta["method"], "settings": meta["settings"],
                    "num_images": len(images), "fingerprint": fingerprint(meta["method"], meta["settings"], images)}
        cache = cls.__new__(cls)
        cache._attach(path, expected, images, create=False)
        return cache

    def _attach(self, directory: str, expected: dict, images: list[list], create: bool) -> None:
        self.directory = directory
        self.method = expected["method"]
        self.settings = expected["settings"]
        self.fingerprint = expected["fingerprint"]
        self.num_images = expected["num_images"]
        self._boxes_dir = os.path.join(directory, BOXES_DIR)
        meta_path = os.path.join(directory, META_FILE)
        if create and not os.path.exists(meta_path):
            os.makedirs(self._boxes_dir, exist_ok=True)
            _write_json(os.path.join(directory, IMAGES_FILE), images)
            self._meta = {**expected, "complete": False}
            _write_json(meta_path, self._meta)  # last: a directory with meta.json has its images.json
            return
        meta = _read_meta(directory)
        _check(directory, meta, expected, images)
        os.makedirs(self._boxes_dir, exist_ok=True)
        self._meta = meta
        for name in os.listdir(self._boxes_dir):  # leftovers of a killed writer (never renamed into place)
            if name.endswith(".tmp"):
                os.remove(os.path.join(self._boxes_dir, name))

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"ProposalCache({self.directory!r}, method={self.method!r}, images={self.num_images}, "
                f"complete={self.complete})")

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_images:
            raise ProposalCacheError(f"{self.directory}: image index {index!r} out of range "
                                     f"(the cache has {self.num_images} images)")
        return int(index)

    def path(self, index: int) -> str:
        return os.path.join(self._boxes_dir, f"{self._index(index):08d}.npy")

    def has(self, index: int) -> bool:
        return os.path.isfile(self.path(index))

    def missing(self) -> list[int]:
        """Indices of the images without boxes, ascending."""
        present = set()
        for name in os.listdir(self._boxes_dir):
            m = _BOX_FILE.match(name)
            if m:
                present.add(int(m.group(1)))
        return [i for i in range(self.num_images) if i not in present]

    def get(self, index: int) -> np.ndarray:
        """Proposals of image ``index``: ``(N, 4)`` float32 xyxy original-image pixels, best-ranked first."""
        path = self.path(index)
        try:
            boxes = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ProposalCacheError(f"{self.directory}: no proposals for image {index} (missing {path}); "
                                     f"compute them with `detkit proposals compute`") from None
        except (ValueError, OSError, EOFError) as exc:
            raise ProposalCacheError(f"{path}: damaged proposals file of image {index} ({exc}); delete it and "
                                     f"compute again") from None
        if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype != np.float32:
            raise ProposalCacheError(f"{path}: expected (N, 4) float32 boxes, got {boxes.shape} {boxes.dtype}")
        return boxes

    def put(self, index: int, boxes: np.ndarray) -> None:
        """Store ``boxes (N, 4)`` (xyxy original-image pixels) of image ``index``, atomically."""
        path = self.path(index)
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ProposalCacheError(f"{self.directory}: image {index}: expected boxes of shape (N, 4), "
                                     f"got {boxes.shape}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(boxes), allow_pickle=False)
        write_bytes_atomic(path, buf.getvalue())

    @property
    def complete(self) -> bool:
        """The marker in meta.json: True once every image had boxes when it was last refreshed
        (``fill_cache`` refreshes it; code that fills a cache with ``put`` calls ``refresh_complete``)."""
        return bool(self._meta["complete"])

    def refresh_complete(self) -> bool:
        """Scan the boxes, set the ``complete`` marker accordingly (meta.json rewritten atomically if it
        changes) and return it."""
        value = not self.missing()
        if self.complete != value:
            self._meta = {**self._meta, "complete": value}
            _write_json(os.path.join(self.directory, META_FILE), self._meta)
        return value


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise ProposalCacheError(f"{directory}: not a proposal cache (no {META_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProposalCacheError(f"{path}: corrupted meta.json ({exc}); delete the directory to recompute") from None
    if not isinstance(meta, dict):
        raise ProposalCacheError(f"{path}: corrupted meta.json (expected a mapping, got {type(meta).__name__})")
    for key, types in (("version", int), ("method", str), ("settings", dict), ("num_images", int),
                       ("fingerprint", str), ("complete", bool)):
        if not isinstance(meta.get(key), types):
            raise ProposalCacheError(f"{path}: corrupted meta.json (field {key!r} is {meta.get(key)!r})")
    return meta


def _read_images(directory: str) -> list | None:
    try:
        with open(os.path.join(directory, IMAGES_FILE), encoding="utf-8") as f:
            images = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return images if isinstance(images, list) else None


def _check(directory: str, meta: dict, expected: dict, images: list[list]) -> None:
    """Raise ProposalCacheError naming the first field in which ``meta`` disagrees with ``expected``."""
    where = f"cache at {directory}"
    if meta["version"] != expected["version"]:
        raise ProposalCacheError(f"{where} has version {meta['version']}, this detkit reads version "
                                 f"{expected['version']}: field 'version' differs; delete it to recompute")
    for key in ("method", "settings"):
        if meta[key] != expected[key]:
            raise ProposalCacheError(f"{where} was computed with {key} {meta[key]!r}, not {expected[key]!r}: "
                                     f"field {key!r} differs")
    if meta["num_images"] != expected["num_images"]:
        raise ProposalCacheError(f"{where} was computed for dataset with {meta['num_images']} images, this one has "
                                 f"{expected['num_images']}: field 'num_images' differs")
    if meta["fingerprint"] != expected["fingerprint"]:
        stored = _read_images(directory) or []
        i = next((k for k, (a, b) in enumerate(zip(stored, images)) if a != b), None)
        if i is not None:
            raise ProposalCacheError(
                f"{where} was computed for another image list (first differing image: index {i}, file "
                f"{images[i][1]}: the cache has {stored[i]}, the dataset {images[i]}): field 'images' differs")
        raise ProposalCacheError(f"{where}: meta.json fingerprint {meta['fingerprint'][:12]}... does not match "
                                 f"{expected['fingerprint'][:12]}... (edited by hand?): field 'fingerprint' differs")


# ----------------------------------------------------------------------------- computing


_worker_fn: Callable | None = None


def _init_worker(fn: Callable) -> None:
    global _worker_fn
    _worker_fn = fn
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would only compete with the others
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it terminates the pool)


def _propose_one(fn: Callable, index: int, path: str) -> tuple[int, np.ndarray | None, str | None]:
    """``(index, boxes, None)``, or ``(index, None, reason)`` for an image that cannot be read."""
    try:
        image = read_image(path)
    except ImageReadError as exc:
        return index, None, str(exc)
    try:
        boxes = fn(image, name=path)
    except Exception as exc:  # the pool would re-raise it without saying which image
        raise RuntimeError(f"{path}: computing proposals failed: {type(exc).__name__}: {exc}") from exc
    return index, np.asarray(boxes, dtype=np.float32), None


def _worker_task(task: tuple[int, str]) -> tuple[int, np.ndarray | None, str | None]:
    return _propose_one(_worker_fn, *task)


def _start_method() -> str:
    # Never fork: the parent has torch (and its thread pools) loaded.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def fill_cache(dataset, cache: ProposalCache, fn: Callable, num_workers: int | None = os.cpu_count(),
                      progress: bool = True) -> ProposalCache:
    """Compute ``fn(image (H, W, 3) uint8 RGB, name=file_name) -> boxes (N, 4)`` for every image of ``dataset``
    that ``cache`` lacks, and store each result as it arrives.

    ``num_workers > 1`` runs ``fn`` in a process pool (``fn`` must be picklable, e.g. a
    ``functools.partial`` of a module-level function); ``num_workers <= 1`` (or None with one core) runs
    in this process. Interrupting leaves only whole files; calling again computes the rest. An unreadable
    image is logged and gets the whole-image box from its annotated width and height.
    """
    if len(dataset) != len(cache):
        raise ProposalCacheError(f"{cache.directory}: the cache has {len(cache)} images, the dataset "
                                 f"{getattr(dataset, 'source', '')} has {len(dataset)}")
    todo = cache.missing()
    if cache.refresh_complete():
        log.info("%s: proposals of all %d images are cached", cache.directory, len(cache))
        return cache
    infos = {i: dataset.image_info(i) for i in todo}
    tasks = [(i, infos[i]["file_name"]) for i in todo]
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    workers = max(1, min(workers, len(tasks)))
    log.info("%s: computing %s proposals of %d of %d images (%d %s)", cache.directory, cache.method, len(todo),
             len(cache), workers, "process" if workers == 1 else "processes")

    from detkit.engine.progress import progress_bar

    unreadable: list[str] = []
    t0 = time.time()
    with progress_bar(total=len(tasks), desc=f"{cache.method} proposals", unit="img", enabled=progress) as bar:
        def store(result: tuple[int, np.ndarray | None, str | None]) -> None:
            index, boxes, error = result
            if error is not None:
                info = infos[index]
                log.warning("%s; its proposal is the whole image (%dx%d from the annotations)", error,
                            info["width"], info["height"])
                unreadable.append(info["file_name"])
                boxes = np.array([[0, 0, info["width"], info["height"]]], np.float32)
            cache.put(index, boxes)
            bar.update(1)

        if workers <= 1:
            for index, path in tasks:
                store(_propose_one(fn, index, path))
        else:
            ctx = multiprocessing.get_context(_start_method())
            with ctx.Pool(workers, initializer=_init_worker, initargs=(fn,)) as pool:
                for result in pool.imap_unordered(_worker_task, tasks, chunksize=1):
                    store(result)
    elapsed = time.time() - t0
    cache.refresh_complete()
    log.info("%s: %d images in %.1f s (%.2f images/s)", cache.directory, len(tasks), elapsed,
             len(tasks) / max(elapsed, 1e-9))
    if unreadable:
        log.warning("%s: %d unreadable images got the whole-image box: %s%s", cache.directory, len(unreadable),
                    ", ".join(unreadable[:5]), " ..." if len(unreadable) > 5 else "")
    return cache


def selective_search_cache(root: str, dataset, mode: str = "fast", max_side: int | None = 500,
                           min_size: float = 0.0, top_k: int | None = None, num_workers: int | None = None,
                           progress: bool = True, compute: bool = True, **knobs) -> ProposalCache:
    """The selective search cache of ``dataset`` under ``root``, computed where it is incomplete.

    Settings are ``{mode, max_side, min_size, top_k}`` plus any ``base_k``/``inc_k``/``sigma`` given
    (``SelectiveSearchProposals.settings()`` names the same cache); the method name is
    ``"selective_search"``. ``compute=False`` only opens (or creates) the directory.
    """
    from detkit.proposals.selective_search import check_settings, selective_search

    knobs = {k: v for k, v in knobs.items() if v is not None}
    check_settings(mode, max_side, top_k, knobs)  # here, not in the first worker
    settings = {"mode": mode, "max_side": max_side, "min_size": min_size, "top_k": top_k, **knobs}
    cache = ProposalCache(root, dataset, "selective_search", settings)
    if compute:
        fn = functools.partial(selective_search, mode=mode, max_side=max_side, min_size=min_size, top_k=top_k,
                               **knobs)
        fill_cache(dataset, cache, fn, num_workers=num_workers, progress=progress)
    return cache
