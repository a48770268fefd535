"""COCO box metric (Lin et al. 2014, "Microsoft COCO", Sec. 5 and the cocodataset.org detection eval).

AP is averaged over the ten IoU thresholds 0.50:0.05:0.95 and over 101 recall
points of the interpolated precision-recall curve, then over categories; AR is
the maximum recall at 1/10/100 detections per image. Crowd regions neither
reward nor penalise a detection. The numbers come from one of two backends that
implement the same algorithm: faster-coco-eval (default, C++) or pycocotools
(the reference). This module only adapts detkit's formats to them, checks that
a results file belongs to the ground truth, and reads per-class AP out of the
accumulated precision array.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("faster_coco_eval", "pycocotools")
DEFAULT_MAX_DETECTIONS = 100  # COCO's own: AP and the third AR count the 100 best detections of an image
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# What each summary number averages over, in pycocotools' own words (printed by format_metrics_table).
_MEANINGS = {"AP": ("0.50:0.95", "all"), "AP50": ("0.50     ", "all"), "AP75": ("0.75     ", "all"),
             "APs": ("0.50:0.95", "small"), "APm": ("0.50:0.95", "medium"), "APl": ("0.50:0.95", "large"),
             "AR1": ("0.50:0.95", "all", 1), "AR10": ("0.50:0.95", "all", 10), "AR100": ("0.50:0.95", "all"),
             "ARs": ("0.50:0.95", "small"), "ARm": ("0.50:0.95", "medium"), "ARl": ("0.50:0.95", "large")}


def stat_names(max_detections: int = DEFAULT_MAX_DETECTIONS) -> tuple[str, ...]:
    """The twelve summary numbers' keys at ``max_detections`` per image: the third AR is ``AR<max_detections>``
    (``AR100`` at COCO's default, ``AR1000`` for dense scenes)."""
    return tuple(f"AR{max_detections}" if name == "AR100" else name for name in STAT_NAMES)


def stat_meanings(max_detections: int = DEFAULT_MAX_DETECTIONS) -> dict[str, str]:
    """What each of :func:`stat_names` averages over, in pycocotools' words."""
    out = {}
    for name, key in zip(STAT_NAMES, stat_names(max_detections)):
        iou, area, *dets = _MEANINGS[name]
        out[key] = f"IoU={iou} area={area:<6} maxDets={dets[0] if dets else max_detections}"
    return out


STAT_MEANINGS = stat_meanings()


def _numpy(x) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco_results(image_id: int, detections: Mapping, cat_ids: list[int]) -> list[dict]:
    """One image's detections as COCO result entries.

    Args:
        image_id: the ground truth's id of the image.
        detections: ``{"boxes": (N, 4) xyxy absolute pixels, "scores": (N,), "labels": (N,) in 1..K}``
            as tensors or arrays.
        cat_ids: ``cat_ids[i - 1]`` is the original category id of label ``i``.

    Returns:
        N dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of plain Python
        numbers at full float precision.
    """
    boxes = _numpy(detections["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(detections["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(detections["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels; "
                         f"expected one of each per detection")
    out = []
    for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        if not 1 <= label <= len(cat_ids):
            raise ValueError(f"image {image_id}: detection label {label} outside 1..{len(cat_ids)} "
                             f"(0 is background and is never a detection)")
        out.append({"image_id": int(image_id), "category_id": int(cat_ids[label - 1]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return out


def _check_gt(gt: Mapping) -> None:
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"ground truth: missing list {key!r} (expected a COCO dict with images, "
                             f"annotations and categories)")
    if not gt["categories"]:
        raise ValueError("ground truth: 'categories' is empty")


def _check_results(gt: Mapping, results: list[dict]) -> None:
    """Raise ValueError naming the first result that is malformed or refers to an image/category not in ``gt``."""
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    if not isinstance(results, list):
        raise ValueError(f"results: expected a list of COCO result dicts, got {type(results).__name__}")
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"result {i}: expected a dict with image_id, category_id, bbox, score; got {r!r}")
        if r.get("image_id") not in image_ids:
            foreign = sorted({str(x.get("image_id")) for x in results if isinstance(x, Mapping)
                              and x.get("image_id") not in image_ids})
            raise ValueError(f"result {i}: image_id {r.get('image_id')!r} is not in the ground truth "
                             f"(results are for another dataset?); {len(foreign)} image ids of the results are not: "
                             f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}")
        if r.get("category_id") not in cat_ids:
            raise ValueError(f"result {i}: category_id {r.get('category_id')!r} is not in the ground truth "
                             f"(results are for another dataset?)")
        bbox, score = r.get("bbox"), r.get("score")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            raise ValueError(f"result {i} (image_id {r['image_id']}): bbox {bbox!r} is not [x, y, w, h] "
                             f"with finite numbers and w, h >= 0")
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise ValueError(f"result {i} (image_id {r['image_id']}): score {score!r} is not a finite number")


def _backend(name: str):
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"eval backend {name!r}: expected one of {', '.join(BACKENDS)}")


@contextlib.contextmanager
def _quiet():
    """pycocotools print()s progress; send it to this module's debug log instead of the user's terminal."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.debug("%s", buffer.getvalue().rstrip())


def _run(gt: Mapping, results: list[dict], backend: str, max_detections: int):
    """Evaluate and accumulate counting the ``max_detections`` best detections of each image; returns the
    backend's COCOeval object (its ``eval`` arrays: :func:`summary` reads the numbers out of them)."""
    COCO, COCOeval = _backend(backend)
    # Both libraries write into the annotation dicts they are given (``ignore``, result ``id``/``area``):
    # shallow per-entry copies keep the caller's ground truth and results unchanged.
    annotations = []
    for ann in gt["annotations"]:
        ann = dict(ann)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        annotations.append(ann)
    dataset = {"info": dict(gt.get("info") or {}), "licenses": list(gt.get("licenses") or []),
               "images": [dict(img) for img in gt["images"]], "annotations": annotations,
               "categories": [dict(c) for c in gt["categories"]]}
    extra = {"print_function": log.debug} if backend == "faster_coco_eval" else {}
    with _quiet():
        coco_gt = COCO(**extra)
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:
            # pycocotools' loadRes fails on an empty list; an index with no annotations evaluates correctly.
            coco_dt = COCO(**extra)
            coco_dt.dataset = {"images": dataset["images"], "annotations": [],
                               "categories": dataset["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox", **extra)
        # AP and the third AR count maxDets[-1] (pycocotools: [2]) detections per image; AR1 and AR10 the others.
        ev.params.maxDets = [1, 10, int(max_detections)]
        ev.evaluate()
        ev.accumulate()
    return ev


def summary(ev) -> list[float]:
    """The twelve summary numbers of an accumulated COCOeval, in :data:`STAT_NAMES` order: the means of its
    precision (AP) and recall (AR) arrays over the entries COCO defines (> -1; -1 where none is), as the
    libraries' ``summarize`` computes them. Read here because pycocotools' ``summarize`` takes AP at 100
    detections whatever ``params.maxDets`` says (its AP is -1 at any other cap)."""
    p = ev.params
    precision = np.asarray(ev.eval["precision"])  # (T iou thresholds, R recall points, K cats, A areas, M maxDets)
    recall = np.asarray(ev.eval["recall"])  # (T, K, A, M)
    area = {label: a for a, label in enumerate(p.areaRngLbl)}
    iou = {round(float(t), 2): t_index for t_index, t in enumerate(p.iouThrs)}

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    last = len(p.maxDets) - 1
    ap = [mean(precision[:, :, :, area["all"], last]), mean(precision[iou[0.5], :, :, area["all"], last]),
          mean(precision[iou[0.75], :, :, area["all"], last])]
    ap += [mean(precision[:, :, :, area[size], last]) for size in ("small", "medium", "large")]
    ar = [mean(recall[:, :, area["all"], m]) for m in range(len(p.maxDets))]
    ar += [mean(recall[:, :, area[size], last]) for size in ("small", "medium", "large")]
    return ap + ar


def evaluate_coco(gt: Mapping, results: list[dict], backend: str = "faster_coco_eval",
                  class_names: list[str] | None = None, max_detections: int = DEFAULT_MAX_DETECTIONS) -> dict:
    """COCO box metrics of ``results`` against ``gt``.

    Args:
        gt: a COCO ground-truth dict (``images``, ``annotations`` with ``bbox`` [x, y, w, h], ``area`` and
            ``iscrowd``, ``categories``). ``categories`` is in label order (label i -> ``categories[i - 1]``),
            as ``Dataset.to_coco`` writes it.
        results: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``; may be empty.
        backend: ``"faster_coco_eval"`` or ``"pycocotools"`` (identical numbers).
        class_names: names for ``per_class`` in the order of ``gt["categories"]``; defaults to their ``name``.
        max_detections: the best this many detections of each image count (COCO's ``maxDets``, 100 by default;
            at least 10). A scene with more objects than that needs more, or its recall is capped.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
        "per_class": {name: AP}, "max_detections": 100}`` with values in [0, 1], or -1 where COCO leaves a
        value undefined (no ground truth of that category or size); ``AR100`` is ``AR<max_detections>``
        (:func:`stat_names`). Per-class AP is the mean of the precision array over IoU thresholds and recall
        points at area "all" and ``max_detections`` detections, ignoring -1 entries.

    Raises:
        ValueError: unknown backend, malformed ground truth or results, or a result whose image_id or
            category_id is not in ``gt``.
    """
    _backend(backend)  # an unknown backend fails before any work
    if isinstance(max_detections, bool) or not isinstance(max_detections, numbers.Integral) or max_detections < 10:
        raise ValueError(f"max_detections={max_detections!r}: expected an integer >= 10 (AR1 and AR10 count 1 and "
                         f"10 detections per image)")
    _check_gt(gt)
    _check_results(gt, results)
    cats = list(gt["categories"])
    if class_names is not None and len(class_names) != len(cats):
        raise ValueError(f"class_names has {len(class_names)} names but the ground truth has {len(cats)} "
                         f"categories")
    names = list(class_names) if class_names is not None else [str(c.get("name", c["id"])) for c in cats]
    ev = _run(gt, results, backend, max_detections)
    metrics: dict = dict(zip(stat_names(max_detections), summary(ev)))
    precision = np.asarray(ev.eval["precision"])  # (T iou thresholds, R recall points, K cats, A areas, M maxDets)
    column = {cat_id: k for k, cat_id in enumerate(ev.params.catIds)}
    all_area = list(ev.params.areaRngLbl).index("all")
    per_class = {}
    for name, cat in zip(names, cats):
        p = precision[:, :, column[cat["id"]], all_area, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else -1.0
    metrics["per_class"] = per_class
    metrics["max_detections"] = int(max_detections)
    return metrics


def images_over_cap(gt: Mapping, max_detections: int, per_class: bool = False) -> list[tuple[int, int]]:
    """``(image id, objects)`` of the images of ``gt`` with more objects (crowd regions not counted) than
    ``max_detections``, the most crowded first: on them recall is capped below 1 whatever the detector does.
    ``per_class``: count the objects of each class apart (COCO's maxDets cuts each image's detections of a
    class; a detector's per-image cap cuts all of them)."""
    counts: dict = {}
    for ann in gt.get("annotations") or []:
        if not ann.get("iscrowd"):
            key = (ann.get("image_id"), ann.get("category_id") if per_class else None)
            counts[key] = counts.get(key, 0) + 1
    most: dict = {}
    for (image, _), n in counts.items():
        if n > max_detections:
            most[image] = max(most.get(image, 0), n)
    return sorted(most.items(), key=lambda item: -item[1])


def _fmt(value: float) -> str:
    return "   n/a" if value < 0 else f"{value:6.3f}"


def format_metrics_table(metrics: Mapping) -> str:
    """The metrics as a plain-text table: the twelve COCO numbers, then AP per class.

    Undefined values (-1: no ground truth of that category or size) print as ``n/a``.
    """
    meanings = stat_meanings(int(metrics.get("max_detections") or DEFAULT_MAX_DETECTIONS))
    lines = ["COCO box metrics", f"{'metric':<7}  {'value':>6}  averaged over", f"{'-' * 7}  {'-' * 6}  {'-' * 38}"]
    lines += [f"{key:<7}  {_fmt(metrics[key])}  {meaning}" for key, meaning in meanings.items() if key in metrics]
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(5, max(len(name) for name in per_class))
        lines += ["", f"{'class':<{width}}  {'AP':>6}", f"{'-' * width}  {'-' * 6}"]
        lines += [f"{name:<{width}}  {_fmt(ap)}" for name, ap in per_class.items()]
    return "\n".join(lines)
