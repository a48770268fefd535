"""Selective search region proposals (Uijlings et al., IJCV 2013), the proposal source of R-CNN
(Sec. 2.1: "~2k region proposals ... selective search's fast mode"), SPP-net (Sec. 4.1) and
Fast R-CNN (Sec. 4.1).

A thin layer over OpenCV's ``cv2.ximgproc.segmentation``: hierarchical grouping of a
Felzenszwalb-Huttenlocher over-segmentation, diversified over colour spaces, segmentation
thresholds ``k`` and similarity strategies, returned in the search's ranking order. This module
adds what detection needs around it: the search runs on a shrunken image and boxes come back in
the original image's pixels as ``(N, 4)`` float32 xyxy, small and duplicate boxes are removed,
and every image gets at least one proposal.

Modes:

- ``"fast"``: OpenCV's ``switchToSelectiveSearchFast`` (HSV and Lab; k = 150, 300, 450; sigma 0.8;
  two strategy combinations).
- ``"quality"``: OpenCV's ``switchToSelectiveSearchQuality`` (five colour spaces, five values of k,
  four strategy combinations).
- ``"rcnn"``: the settings R-CNN ran (Uijlings et al.'s fast mode as R-CNN's
  ``selective_search_boxes.m`` sets it up): the image resized to a width of 500 pixels, colour
  spaces HSV and Lab, graph segmentation with k in {50, 100} (minimum segment size k) and sigma 0.8,
  strategies colour+texture+size+fill and texture+size+fill. R-CNN then dropped boxes narrower or
  shorter than 20 pixels: pass ``min_size=20`` for that.

OpenCV ranks regions by ``level x random number`` drawn from the C library's ``rand()``, so the
order (and, after ``top_k``, the set) of boxes depends on that generator's state. It is re-seeded
before every search, which makes the output a function of the image and the settings alone (the
same in any process, whichever images ran before).
"""
from __future__ import annotations

import ctypes
import logging

import cv2
import numpy as np

log = logging.getLogger(__name__)

MODES = ("fast", "quality", "rcnn")
RCNN_WIDTH = 500  # R-CNN resizes every image to this width before the search
RCNN_KS = (50, 100)
RCNN_SIGMA = 0.8
_RAND_SEED = 1


def _segmentation_module():
    """``cv2.ximgproc.segmentation``, or a RuntimeError that says how to get it."""
    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is None:
        raise RuntimeError(
            f"selective search needs cv2.ximgproc, which this OpenCV ({cv2.__version__}, {cv2.__file__}) does not "
            "have: it ships in opencv-contrib-python-headless. Another OpenCV wheel installed over it (opencv-python, "
            "opencv-python-headless) hides it; reinstall the contrib build with "
            "`pip install --force-reinstall --no-deps opencv-contrib-python-headless`")
    return ximgproc.segmentation


def _c_srand():
    """The C library's ``srand`` (the generator OpenCV's selective search ranks with), None if not reachable."""
    try:
        return ctypes.CDLL(None).srand  # POSIX: the symbols of the running process, libc among them
    except (OSError, AttributeError, TypeError):
        return None


_srand = _c_srand()


def _as_rgb(image: np.ndarray, name: str | None) -> np.ndarray:
    what = name or "image"
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: selective search expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])  # alpha dropped, colours kept (as detkit.data.images does)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"{what}: expected an (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale image, "
                     f"got shape {tuple(image.shape)}")


def check_settings(mode: str, max_side: int | None, top_k: int | None, knobs: dict) -> None:
    """Raise ValueError for settings ``selective_search`` cannot run with (``knobs``: base_k, inc_k, sigma); the
    message starts with the offending setting's name."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected a selective search mode, one of {', '.join(MODES)}")
    unknown = sorted(set(knobs) - {"base_k", "inc_k", "sigma"})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: unknown selective search settings (expected base_k, inc_k, sigma)")
    if mode == "rcnn" and knobs:
        raise ValueError(f"{', '.join(knobs)}: apply to modes 'fast' and 'quality' only; mode 'rcnn' fixes the "
                         f"graph segmentation (k in {list(RCNN_KS)}, sigma {RCNN_SIGMA})")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side={max_side}: expected a positive number of pixels or None")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: expected a positive count or None")


def _configure_rcnn(ss, segmentation, image_bgr: np.ndarray) -> None:
    """R-CNN's fast mode: 2 colour spaces x 2 values of k x 2 strategy combinations = 8 groupings."""
    for code in (cv2.COLOR_BGR2HSV, cv2.COLOR_BGR2Lab):
        ss.addImage(cv2.cvtColor(image_bgr, code))
    for k in RCNN_KS:
        ss.addGraphSegmentation(segmentation.createGraphSegmentation(sigma=RCNN_SIGMA, k=float(k), min_size=k))
    colour = segmentation.createSelectiveSearchSegmentationStrategyColor()
    texture = segmentation.createSelectiveSearchSegmentationStrategyTexture()
    size = segmentation.createSelectiveSearchSegmentationStrategySize()
    fill = segmentation.createSelectiveSearchSegmentationStrategyFill()
    ss.addStrategy(segmentation.createSelectiveSearchSegmentationStrategyMultiple(colour, texture, size, fill))
    ss.addStrategy(segmentation.createSelectiveSearchSegmentationStrategyMultiple(texture, size, fill))


def selective_search(image: np.ndarray, mode: str = "fast", max_side: int | None = 500, min_size: float = 0.0,
                     top_k: int | None = None, name: str | None = None, base_k: int | None = None,
                     inc_k: int | None = None, sigma: float | None = None) -> np.ndarray:
    """Selective search proposals of one image, best-ranked first.

    Args:
        image: ``(H, W, 3)`` uint8 RGB; ``(H, W)`` grayscale and ``(H, W, 4)`` RGBA are converted.
        mode: ``"fast"``, ``"quality"`` or ``"rcnn"`` (see the module docstring).
        max_side: the search runs on the image shrunk so that its longer side is at most this
            (None: full size); ignored by ``"rcnn"``, which resizes to a width of 500 as R-CNN did.
        min_size: boxes narrower or shorter than this (original-image pixels) are dropped.
        top_k: keep the first ``top_k`` boxes (None: all).
        name: the image's name, for the warning when the search finds nothing.
        base_k, inc_k, sigma: graph segmentation settings of ``"fast"``/``"quality"`` (None: OpenCV's
            defaults, 150, 150 and 0.8).

    Returns:
        boxes ``(N, 4)`` float32 xyxy in the original image's pixels, ``0 <= x1 < x2 <= W``,
        ``0 <= y1 < y2 <= H`` (``x2 = x + w``, as torchvision), without duplicates, ``N >= 1``: when
        nothing is left the whole image ``[0, 0, W, H]`` is returned (and a warning logged).
    """
    knobs = {k: v for k, v in (("base_k", base_k), ("inc_k", inc_k), ("sigma", sigma)) if v is not None}
    check_settings(mode, max_side, top_k, knobs)
    segmentation = _segmentation_module()
    rgb = _as_rgb(image, name)
    height, width = rgb.shape[:2]

    if mode == "rcnn":
        scale = RCNN_WIDTH / width
    elif max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
    else:
        scale = 1.0
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)

    ss = segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast(**knobs)
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality(**knobs)
    else:
        _configure_rcnn(ss, segmentation, bgr)
    if _srand is not None:
        _srand(_RAND_SEED)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # (N, 4) x, y, w, h at the search's size

    searched_h, searched_w = bgr.shape[:2]
    boxes = np.empty_like(rects)
    boxes[:, :2] = rects[:, :2]
    boxes[:, 2:] = rects[:, :2] + rects[:, 2:]
    boxes *= np.array([width / searched_w, height / searched_h] * 2)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes = boxes.astype(np.float32)

    box_w = boxes[:, 2] - boxes[:, 0]
    box_h = boxes[:, 3] - boxes[:, 1]
    boxes = boxes[(box_w >= max(min_size, 1e-6)) & (box_h >= max(min_size, 1e-6))]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)  # first occurrence of each distinct box
        boxes = boxes[np.sort(first)]
    if top_k is not None:
        boxes = boxes[:top_k]
    if len(boxes) == 0:
        if name is not None:
            log.warning("%s: selective search found no region (min_size=%s); using the whole image as the only "
                        "proposal", name, min_size)
        return np.array([[0, 0, width, height]], dtype=np.float32)
    return boxes
