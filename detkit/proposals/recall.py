"""Proposal recall: the fraction of ground-truth objects covered by at least one of an image's top-n
proposals at IoU >= t, as a function of n.

This is how the papers compare proposal sources: Uijlings et al. report recall at the Pascal
criterion (IoU 0.5) against the number of boxes; Faster R-CNN ("Analysis of Recall-to-IoU",
Sec. 4.1 and its recall-vs-IoU figure) compares selective search, EdgeBoxes and the RPN at 300,
1000 and 2000 proposals. Crowd regions and VOC ``difficult`` objects are left out by the caller.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from detkit.engine.files import write_bytes_atomic

DEFAULT_COUNTS = (10, 50, 100, 300, 500, 1000, 2000)
DEFAULT_IOU_THRESHOLDS = (0.5, 0.7)


def proposal_recall(gt_boxes: Sequence[np.ndarray], proposals: Sequence[np.ndarray],
                    counts: Sequence[int] = DEFAULT_COUNTS,
                    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS) -> dict:
    """Recall of the top-n proposals per image, for each n in ``counts`` and each IoU threshold.

    Args:
        gt_boxes: per image, ``(G_i, 4)`` xyxy ground-truth boxes (crowd/difficult already removed).
        proposals: per image, ``(N_i, 4)`` xyxy proposals in ranking order (best first).
        counts: numbers of proposals n; an image with fewer than n proposals uses all of them.
        iou_thresholds: a ground truth is recalled at t when some proposal has IoU >= t with it.

    Returns:
        ``{"counts": [n...], "iou_thresholds": [t...], "recall": {str(t): [recall at each n]},
        "num_images", "num_gt", "mean_proposals" (proposals per image, all of them),
        "mean_proposals_used": [mean of min(n, N_i) at each n]}``.
    """
    if len(gt_boxes) != len(proposals):
        raise ValueError(f"proposal_recall: {len(gt_boxes)} ground-truth lists but {len(proposals)} proposal lists")
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"proposal_recall: counts {counts}: expected positive numbers of proposals")
    thresholds = torch.tensor([float(t) for t in iou_thresholds], dtype=torch.float64)
    count_t = torch.tensor(counts)
    hits = torch.zeros(len(thresholds), len(counts), dtype=torch.int64)  # recalled gt per (threshold, count)
    num_gt = 0
    num_proposals = []
    for i, (gt, props) in enumerate(zip(gt_boxes, proposals)):
        gt = torch.as_tensor(np.asarray(gt, dtype=np.float64)).reshape(-1, 4)
        props = torch.as_tensor(np.asarray(props, dtype=np.float64)).reshape(-1, 4)
        num_gt += len(gt)
        num_proposals.append(len(props))
        if len(gt) == 0 or len(props) == 0:
            continue
        # best[g, j]: the highest IoU of gt g with proposals 0..j (a running max along the ranking).
        best = box_iou(gt, props).cummax(dim=1).values  # (G, N)
        best_at = best[:, (count_t.clamp(max=len(props)) - 1)]  # (G, C): best IoU among the top n
        hits += (best_at[None] >= thresholds[:, None, None]).sum(dim=1)  # (T, G, C) -> (T, C)
    if num_gt == 0:
        raise ValueError(f"proposal_recall: the {len(gt_boxes)} images have no ground-truth boxes; recall is "
                         f"undefined")
    n = np.asarray(num_proposals, dtype=np.float64)
    return {
        "counts": counts,
        "iou_thresholds": [float(t) for t in iou_thresholds],
        "recall": {_key(t): (hits[k].double() / num_gt).tolist() for k, t in enumerate(iou_thresholds)},
        "num_images": len(gt_boxes),
        "num_gt": num_gt,
        "mean_proposals": float(n.mean()) if len(n) else 0.0,
        "mean_proposals_used": [float(np.minimum(n, c).mean()) if len(n) else 0.0 for c in counts],
    }


def _key(threshold: float) -> str:
    return f"{float(threshold):g}"


def format_recall_table(results: dict[str, dict]) -> str:
    """A text table: one row per method, a column per (count, IoU threshold), plus proposals per image."""
    if not results:
        return "(no results)\n"
    counts = sorted({c for r in results.values() for c in r["counts"]})
    thresholds = sorted({_key(t) for r in results.values() for t in r["iou_thresholds"]}, key=float)
    name_w = max(len("method"), *(len(m) for m in results))
    columns = [(c, t) for c in counts for t in thresholds]
    labels = [f"R{t}@{c}" for c, t in columns]
    widths = [max(6, len(label)) for label in labels]
    header = f"{'method':<{name_w}}  {'props/img':>9}  " + "  ".join(f"{l:>{w}}" for l, w in zip(labels, widths))
    lines = [header, "-" * len(header)]
    for method, r in results.items():
        cells = []
        for (c, t), w in zip(columns, widths):
            values = r["recall"].get(t)
            cells.append(f"{values[r['counts'].index(c)]:>{w}.3f}" if values and c in r["counts"] else f"{'-':>{w}}")
        lines.append(f"{method:<{name_w}}  {r['mean_proposals']:>9.1f}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"


def plot_recall(results: dict[str, dict], path: str | os.PathLike) -> None:
    """Recall against the number of proposals (log scale), a line per method and IoU threshold, written to
    ``path`` (format from its extension, e.g. ``.png``) atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, no GUI
    ax = fig.add_subplot(1, 1, 1)
    styles = ["-", "--", ":", "-."]
    for m, (method, r) in enumerate(results.items()):
        colour = f"C{m % 10}"
        for k, t in enumerate(sorted(r["recall"], key=float)):
            ax.plot(r["counts"], r["recall"][t], styles[k % len(styles)], color=colour, marker="o", markersize=3,
                    label=f"{method}, IoU {t}")
    ax.set_xscale("log")
    ax.set_xlabel("number of proposals per image")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    write_bytes_atomic(path, buf.getvalue())
