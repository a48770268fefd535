"""Evaluation and training reports people can look at.

- Precision-recall curves per class (IoU 0.5, all-point interpolation as in VOC2010+).
- An error breakdown in the spirit of the COCO analysis tool (Hoiem et al. 2012): each confident
  detection is correct, a localisation error (right class, 0.1 <= IoU < 0.5, or a duplicate), a confusion
  with another class (IoU >= 0.1 with an object of another class), or background (IoU < 0.1 with every
  object); objects no detection finds are missed.
- A gallery of the worst and best images (detections beside ground truth), ranked by per-image F1 at
  IoU 0.5.
- Loss and learning-rate curves from a training log.

Plots use matplotlib's Agg backend (no display needed). Every file is written atomically.
"""
from __future__ import annotations

import json
import re
import os
from collections import defaultdict

import numpy as np

from detkit.engine.files import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Save ``fig`` to ``path`` atomically (its format by the extension, which the temporary keeps) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)


def _xyxy(b) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def error_breakdown(gt: dict, results: list[dict], score_thr: float = 0.5) -> dict:
    """Counts of correct / localisation / confusion / background detections and missed objects, per image
    F1 scores for the gallery, over detections scoring at least ``score_thr``."""
    gts = defaultdict(list)
    for a in gt["annotations"]:
        gts[a["image_id"]].append((_xyxy(a["bbox"]), a["category_id"], bool(a.get("iscrowd", 0))))
    dets = defaultdict(list)
    for r in results:
        if r["score"] >= score_thr:
            dets[r["image_id"]].append((_xyxy(r["bbox"]), r["category_id"], r["score"]))
    counts = {"correct": 0, "localisation": 0, "confusion": 0, "background": 0, "missed": 0}
    per_image = {}
    for img in gt["images"]:
        i = img["id"]
        g = [x for x in gts[i] if not x[2]]
        gb = np.array([x[0] for x in g], np.float64).reshape(-1, 4)
        gc = np.array([x[1] for x in g])
        d = sorted(dets[i], key=lambda x: -x[2])
        db = np.array([x[0] for x in d], np.float64).reshape(-1, 4)
        iou = _iou(db, gb)
        found = np.zeros(len(g), bool)
        tp = 0
        for k, (_, cat, _) in enumerate(d):
            same = gc == cat
            best_same = iou[k][same].max() if same.any() else 0.0
            best_other = iou[k][~same].max() if (~same).any() else 0.0
            if best_same >= 0.5:
                j = int(np.flatnonzero(same)[np.argmax(iou[k][same])])
                if not found[j]:
                    found[j] = True
                    counts["correct"] += 1
                    tp += 1
                else:
                    counts["localisation"] += 1  # a duplicate
            elif best_same >= 0.1:
                counts["localisation"] += 1
            elif best_other >= 0.1:
                counts["confusion"] += 1
            else:
                counts["background"] += 1
        counts["missed"] += int((~found).sum())
        denom = len(d) + len(g)
        per_image[i] = 1.0 if denom == 0 else 2.0 * tp / denom
    return {"score_thr": score_thr, "counts": counts, "per_image_f1": per_image}


def plot_pr_curves(curves: dict, path: str, title: str = "precision-recall at IoU 0.5") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, c in curves.items():
        if c["recall"]:
            ax.plot([0.0] + c["recall"], [1.0] + c["precision"], label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)


def plot_errors(breakdown: dict, path: str) -> None:
    plt = _plt()
    counts = breakdown["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = ["#3a7d44", "#e0a800", "#c44e52", "#8172b2", "#777777"]
    ax.bar(list(counts), list(counts.values()), color=colours)
    for k, v in enumerate(counts.values()):
        ax.text(k, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_title(f"detections with score >= {breakdown['score_thr']} and missed objects")
    _save(fig, path)


def write_gallery(dataset, gt: dict, results: list[dict], f1: dict, path: str, worst: bool, n: int = 6,
                  score_thr: float = 0.5) -> None:
    """A grid of ``n`` images: detections scoring at least ``score_thr`` (left, tagged "name score") beside the
    ground truth (right, tagged with the class name only)."""
    import cv2

    from detkit.data.media import write_image_atomic
    from detkit.evaluation.drawing import draw_detections

    index_of = {dataset.image_info(k)["id"]: k for k in range(len(dataset))}
    ranked = sorted(f1, key=lambda i: (f1[i], i), reverse=not worst)[:n]
    names = list(dataset.class_names)
    label_of = {c: k + 1 for k, c in enumerate(dataset.cat_ids)}
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    tiles = []
    for image_id in ranked:
        k = index_of[image_id]
        image, target = dataset[k]
        d = by_image[image_id]
        det = draw_detections(image, [_xyxy(r["bbox"]) for r in d], [r["score"] for r in d],
                              [label_of[r["category_id"]] for r in d], names, score_thr)
        truth = draw_detections(image, target["boxes"].numpy(), None, target["labels"].numpy(), names)  # no scores
        pair = np.concatenate([det, np.full((image.shape[0], 4, 3), 255, np.uint8), truth], 1)
        cv2.putText(pair, f"id {image_id} F1 {f1[image_id]:.2f}", (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(pair)
    if not tiles:
        return
    write_image_atomic(path, np.concatenate([_fit_cell(t) for t in tiles], 0))


#: one gallery row (detections beside ground truth), height x width: every pair is scaled to fit it, so one
#: very wide or tall image neither stretches the others nor makes the picture huge
GALLERY_CELL = (480, 1284)


def _fit_cell(pair: np.ndarray) -> np.ndarray:
    """``pair`` scaled (keeping its aspect) to fit :data:`GALLERY_CELL`, on a dark cell of that size."""
    import cv2

    cell_h, cell_w = GALLERY_CELL
    h, w = pair.shape[:2]
    scale = min(cell_h / h, cell_w / w)
    size = (max(1, min(cell_w, round(w * scale))), max(1, min(cell_h, round(h * scale))))
    fitted = cv2.resize(pair, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cell = np.full((cell_h, cell_w, 3), 32, np.uint8)
    cell[: size[1], : size[0]] = fitted
    return cell


def evaluation_report(dataset, gt: dict, results: list[dict], out_dir: str, class_names: list[str],
                      score_thr: float = 0.5) -> dict:
    """Write pr_curves.png, errors.png, gallery_worst.png, gallery_best.png; returns the error breakdown."""
    from detkit.evaluation.voc_eval import evaluate_voc

    os.makedirs(out_dir, exist_ok=True)
    voc = evaluate_voc(gt, results, metric="voc", class_names=class_names)
    plot_pr_curves(voc["curves"], os.path.join(out_dir, "pr_curves.png"))
    breakdown = error_breakdown(gt, results, score_thr)
    plot_errors(breakdown, os.path.join(out_dir, "errors.png"))
    if dataset is not None:
        write_gallery(dataset, gt, results, breakdown["per_image_f1"], os.path.join(out_dir, "gallery_worst.png"),
                      worst=True, score_thr=score_thr)
        write_gallery(dataset, gt, results, breakdown["per_image_f1"], os.path.join(out_dir, "gallery_best.png"),
                      worst=False, score_thr=score_thr)
    return {"score_thr": score_thr, "counts": breakdown["counts"]}


def plot_training_curves(log_path: str, path: str) -> None:
    """Loss terms and learning rate against iteration, from a ``log.jsonl``; with accuracies in the log
    (``top1/train``, ``top1/val``, ... of ``detkit pretrain``) or validation AP (``val/AP``, ``val/AP50`` of
    ``train.eval_period``) a third panel shows them (the other ``val/*`` stay in the log). Validation records
    (``*/val``, without a learning rate) are plotted at their own iterations."""
    with open(log_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        return
    keys = list(dict.fromkeys(k for r in records for k in r))
    accuracy = [k for k in keys if re.match(r"top\d+/", k) or k in ("val/AP", "val/AP50", "val/mAP")]
    losses = [k for k in keys if ("/" in k or k == "total") and k not in accuracy and not k.startswith("val/")]
    plt = _plt()
    fig, axes = plt.subplots(3 if accuracy else 2, 1, figsize=(7, 8.5 if accuracy else 6), sharex=True)
    for key in losses:
        points = [(r["iter"], r[key]) for r in records if key in r]
        axes[0].plot(*zip(*points), label=key, marker="o" if key.endswith("/val") else None, markersize=3)
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    steps = [(r["iter"], r["lr"]) for r in records if "lr" in r]
    axes[1].plot(*zip(*steps), color="k")
    axes[1].set_ylabel("learning rate")
    for key in accuracy:
        points = [(r["iter"], r[key]) for r in records if key in r]
        axes[2].plot(*zip(*points), label=key, marker="o" if "val" in key.split("/") else None, markersize=3)
    if accuracy:
        axes[2].set_ylabel("validation" if any(k.startswith("val/") for k in accuracy) else "accuracy")
        axes[2].set_ylim(0, 1.02)
    save_iteration_plot(fig, axes, path, legend_size=7)


def save_iteration_plot(fig, axes, path: str, legend_size: int) -> None:
    """Grids, legends where there are labels, "iteration" under the last of ``axes``, and :func:`_save`."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    axes[-1].set_xlabel("iteration")
    _save(fig, path)
