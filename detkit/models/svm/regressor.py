"""R-CNN's class-specific bounding-box regressors (Girshick et al. 2014, Appendix C): ridge regression
(lambda = 1000) from pool5 features of the proposals of IoU > 0.6 with a ground truth of the class to the
targets (t_x, t_y, t_w, t_h) that take the proposal to that ground truth.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from detkit.models.feature_cache import FeatureCache, FeatureCacheError
from detkit.models.svm.head import POOLED
from detkit.ops import BoxCoder

log = logging.getLogger(__name__)


def box_regression_targets(proposals: Tensor, gt_boxes: Tensor) -> Tensor:
    """R-CNN's targets (Appendix C) taking ``proposals (N, 4)`` to ``gt_boxes (N, 4)`` -> ``(N, 4)``:
    ``t_x = (g_x - p_x) / p_w``, ``t_y = (g_y - p_y) / p_h``, ``t_w = log(g_w / p_w)``, ``t_h = log(g_h / p_h)``
    with centres (x, y) and sizes (w, h) as :class:`~detkit.ops.BoxCoder` measures them (weights 1)."""
    return BoxCoder((1.0, 1.0, 1.0, 1.0)).encode(gt_boxes, proposals)


def ridge_regression(features: np.ndarray, rows: np.ndarray, targets: Tensor, lam: float, scale: float = 1.0,
                     chunk_rows: int = 4096, device: str | torch.device = "cpu") -> Tensor:
    """Closed-form ridge regression with an unregularised bias, in float64.

    features: ``(N_all, P)`` (a memmap); rows ``(N,)``: the samples (ascending rows read the memmap
    sequentially); targets ``(N, C)``. Features are
    multiplied by ``scale`` and centred, so the bias is the targets' mean minus the centred fit and is not
    shrunk. Primal ``(Xc^T Xc + lam I)^-1 Xc^T Y`` when ``P + 1 <= N`` (``X^T X`` accumulated over chunks of
    ``chunk_rows`` rows), dual ``Xc^T (Xc Xc^T + lam I)^-1 Y`` otherwise (X is then smaller than a P x P
    matrix, so it is loaded whole). Returns ``(P + 1, C)``: weights, then the bias row.
    """
    rows = np.asarray(rows, np.int64)
    n, p = len(rows), features.shape[1]
    if n == 0:
        raise ValueError("ridge_regression needs at least one sample")
    y = targets.to(device=device, dtype=torch.float64)

    def load(r: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(features[r], np.float64)).to(device) * scale

    chunks = [slice(i, min(n, i + chunk_rows)) for i in range(0, n, chunk_rows)]
    mu = sum(load(rows[c]).sum(0) for c in chunks) / n
    y_mean = y.mean(0)
    if p + 1 <= n:
        gram = torch.zeros(p, p, dtype=torch.float64, device=device)
        xty = torch.zeros(p, y.shape[1], dtype=torch.float64, device=device)
        for c in chunks:
            xc = load(rows[c]) - mu
            gram += xc.T @ xc
            xty += xc.T @ (y[c] - y_mean)
        gram.diagonal().add_(lam)
        w = _solve_spd(gram, xty)
    else:
        xc = torch.cat([load(rows[c]) for c in chunks]) - mu
        kernel = xc @ xc.T
        kernel.diagonal().add_(lam)
        w = xc.T @ _solve_spd(kernel, y - y_mean)
    return torch.cat([w, (y_mean - mu @ w)[None]]).cpu()


def _solve_spd(a: Tensor, b: Tensor) -> Tensor:
    """``a^-1 b`` for symmetric positive (semi-)definite ``a``: Cholesky, LU when ``a`` is too ill-conditioned."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)


def train_box_regressor(cache: FeatureCache, num_classes: int, lam: float = 1000.0, min_iou: float = 0.6, *,
                        classes: Sequence[str] | None = None, feature: str = POOLED, pooled_scale: float = 1.0,
                        chunk_rows: int = 4096, device: str | torch.device = "cpu"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Class-specific ridge regressors from pool5 features to R-CNN's box targets (Appendix C).

    Samples of class k: rows with ``matched_label == k`` and ``matched_iou > min_iou`` (proposals and
    ground-truth boxes, whose targets are 0), features multiplied by ``pooled_scale``. Targets
    (:func:`box_regression_targets` of the matched ground truth) are standardised per class, then fitted
    by :func:`ridge_regression` (bias not regularised). A class without samples is warned about and keeps
    zero weights (its boxes stay the proposals).

    Returns ``reg_weight (K, P+1, 4)`` (last row: bias), ``reg_mean (K, 4)``, ``reg_std (K, 4)`` (float32;
    the raw target is ``(x @ W[:P] + W[P]) * std + mean``) and per-class statistics (``samples``,
    ``train_error``: mean squared error of the standardised targets).
    """
    if cache.num_classes != num_classes:
        raise FeatureCacheError(f"{cache.path}: the cache has {cache.num_classes} classes, not {num_classes}")
    names = list(classes) if classes is not None else [f"class {k}" for k in range(1, num_classes + 1)]
    feats = cache.features(feature)
    p = feats.shape[1]
    reg_weight = np.zeros((num_classes, p + 1, 4), np.float32)
    reg_mean = np.zeros((num_classes, 4), np.float32)
    reg_std = np.ones((num_classes, 4), np.float32)
    matched_label, matched_iou = np.asarray(cache.matched_label), np.asarray(cache.matched_iou)
    stats = []
    for k in range(num_classes):
        rows = np.flatnonzero((matched_label == k + 1) & (matched_iou > min_iou))
        stats.append({"class": names[k], "samples": len(rows), "train_error": float("nan")})
        if not len(rows):
            log.warning("box regressor of class %r: no proposals with IoU > %g; its boxes stay the proposals",
                        names[k], min_iou)
            continue
        targets = box_regression_targets(torch.from_numpy(np.asarray(cache.boxes[rows], np.float64)),
                                         torch.from_numpy(np.asarray(cache.matched_gt[rows], np.float64)))
        mean = targets.mean(0)
        std = targets.std(0, correction=0)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # one sample, or all targets equal
        y = (targets - mean) / std
        w = ridge_regression(feats, rows, y, lam, pooled_scale, chunk_rows, device)
        reg_weight[k], reg_mean[k], reg_std[k] = w.numpy(), mean.numpy(), std.numpy()
        stats[k]["train_error"] = _regression_error(feats, rows, y, w, pooled_scale, chunk_rows)
    return reg_weight, reg_mean, reg_std, stats


def _regression_error(features: np.ndarray, rows: np.ndarray, y: Tensor, w: Tensor, scale: float,
                      chunk_rows: int) -> float:
    """Mean squared error of the fit ``w (P+1, C)`` on the standardised targets ``y (N, C)``."""
    total = 0.0
    for i in range(0, len(rows), chunk_rows):
        x = torch.from_numpy(np.asarray(features[rows[i:i + chunk_rows]], np.float64)) * scale
        total += float(((x @ w[:-1] + w[-1] - y[i:i + chunk_rows]) ** 2).sum())
    return total / y.numel()
