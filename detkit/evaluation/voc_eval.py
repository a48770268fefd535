"""The PASCAL VOC detection metric, as the official devkit defines it (Everingham et al. 2010, Sec. 4.2;
``VOCevaldet.m``).

Per class, detections of all images are ranked by decreasing confidence (a stable sort, as MATLAB's).
Each is assigned to the ground-truth box of its image with the highest overlap; with overlap >= 0.5 it
is a true positive if that box is not "difficult" and not yet taken, a false positive if it is already
taken (a duplicate), and neither if the box is difficult; otherwise it is a false positive. Recall counts
only non-difficult boxes. AP is the 11-point interpolated average precision (VOC2007) or the area under
the monotone precision envelope (VOC2010 and later). The devkit's "+1" pixel areas are what detkit's
continuous coordinates give for VOC boxes (they are read as ``(xmin - 1, ymin - 1, xmax, ymax)``).

Ground truth comes as a COCO-format dict in which ``iscrowd = 1`` marks difficult (ignored) boxes, as
``DetectionDataset.to_coco()`` writes them; detections in the COCO results format.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from detkit.evaluation.coco_eval import _check_results


def _xyxy(bbox) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate_class(gt_boxes: dict, gt_difficult: dict, dets: list[tuple[int, float, list[float]]],
                   iou_threshold: float = 0.5, use_07_metric: bool = False) -> dict:
    """One class. gt_boxes[image] (G, 4) xyxy, gt_difficult[image] (G,) bool; dets: (image, score, box).

    Returns AP (NaN when the class has no non-difficult ground truth), precision and recall arrays.
    """
    npos = int(sum((~d).sum() for d in gt_difficult.values()))
    order = np.argsort(-np.array([d[1] for d in dets], dtype=np.float64), kind="stable")
    taken = {img: np.zeros(len(b), bool) for img, b in gt_boxes.items()}
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    for rank, k in enumerate(order):
        image, _, box = dets[k]
        gts = gt_boxes.get(image)
        if gts is None or len(gts) == 0:
            fp[rank] = 1
            continue
        ix1 = np.maximum(gts[:, 0], box[0])
        iy1 = np.maximum(gts[:, 1], box[1])
        ix2 = np.minimum(gts[:, 2], box[2])
        iy2 = np.minimum(gts[:, 3], box[3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        union = (box[2] - box[0]) * (box[3] - box[1]) + (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]) - inter
        overlaps = inter / union
        j = int(np.argmax(overlaps))
        if overlaps[j] >= iou_threshold:
            if gt_difficult[image][j]:
                continue  # neither true nor false positive
            if not taken[image][j]:
                tp[rank] = 1
                taken[image][j] = True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    # Ignored (difficult) detections leave both counts unchanged at their rank, as in the devkit.
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    if npos == 0:
        return {"AP": float("nan"), "precision": np.zeros(0), "recall": np.zeros(0), "npos": 0}
    recall = tp_c / npos
    precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    return {"AP": average_precision(recall, precision, use_07_metric), "precision": precision, "recall": recall,
            "npos": npos}


def evaluate_voc(gt: dict, results: list[dict], metric: str = "voc07", iou_threshold: float = 0.5,
                 class_names: list[str] | None = None) -> dict:
    """VOC AP per class and mAP. ``metric``: ``voc07`` (11-point) or ``voc`` (VOC2010+ area)."""
    if metric not in ("voc07", "voc"):
        raise ValueError(f"VOC metric {metric!r}: expected 'voc07' or 'voc'")
    _check_results(gt, results)
    # The ground truth's own category order is the label order class_names follows (not id order).
    cats = list(gt["categories"])
    names = list(class_names) if class_names else [c.get("name", str(c["id"])) for c in cats]
    if len(names) != len(cats):
        raise ValueError(f"{len(names)} class names for {len(cats)} ground-truth categories")
    image_ids = [img["id"] for img in gt["images"]]
    boxes = {c["id"]: defaultdict(list) for c in cats}
    difficult = {c["id"]: defaultdict(list) for c in cats}
    for ann in gt["annotations"]:
        boxes[ann["category_id"]][ann["image_id"]].append(_xyxy(ann["bbox"]))
        difficult[ann["category_id"]][ann["image_id"]].append(bool(ann.get("iscrowd", 0)))
    dets = defaultdict(list)
    for r in results:
        dets[r["category_id"]].append((r["image_id"], float(r["score"]), _xyxy(r["bbox"])))
    per_class, curves = {}, {}
    for name, cat in zip(names, cats):
        cid = cat["id"]
        gb = {i: np.array(boxes[cid].get(i, []), np.float64).reshape(-1, 4) for i in image_ids}
        gd = {i: np.array(difficult[cid].get(i, []), bool) for i in image_ids}
        res = evaluate_class(gb, gd, dets[cid], iou_threshold, metric == "voc07")
        per_class[name] = res["AP"]
        curves[name] = {"precision": res["precision"].tolist(), "recall": res["recall"].tolist()}
    valid = [v for v in per_class.values() if not np.isnan(v)]
    return {"mAP": float(np.mean(valid)) if valid else float("nan"), "metric": metric,
            "iou_threshold": iou_threshold, "per_class": per_class, "curves": curves}


def format_voc_table(metrics: dict) -> str:
    names = list(metrics["per_class"])
    width = max([8] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  AP", f"{'-' * width}  ------"]
    lines += [f"{n:<{width}}  {ap:6.4f}" if not np.isnan(ap) else f"{n:<{width}}     n/a (no ground truth)"
              for n, ap in metrics["per_class"].items()]
    lines += [f"{'-' * width}  ------", f"{'mAP':<{width}}  {metrics['mAP']:6.4f}  ({metrics['metric']}, IoU "
                                          f"{metrics['iou_threshold']})"]
    return "\n".join(lines)
