"""R-CNN's post-hoc classifiers and box regressor (Girshick et al. 2014, Sec. 2.3, Appendix B and C).

After fine-tuning, R-CNN throws the softmax layer away and trains one linear SVM per class
on fc7 features scaled so their mean L2 norm is 20 (Sec. 2.3). Positives are the ground-truth
boxes of the class only; negatives are regions whose IoU with every ground truth of the class
is below 0.3; regions in between are ignored (Appendix B). The negatives do not fit in memory,
so they are mined: the training set is scanned once, negatives scoring above -1.0001 are added
to a cache, the SVM is retrained (liblinear, C = 0.001, positive loss weight 2, bias feature 10)
whenever enough new ones came in, and cached negatives scoring below -1.2 are evicted.
A class-specific ridge regressor on pool5 features (lambda = 1000, proposals of IoU > 0.6 with
a ground truth of the class) then predicts the targets (t_x, t_y, t_w, t_h) of Appendix C.

:class:`SVMBoxHead` is the predictor of the RoI heads that holds both; :func:`fit_svm_head`
runs the whole stage: region features into a :class:`~detkit.feature_cache.FeatureCache`,
SVMs by :func:`train_linear_svms`, regressor by :func:`train_box_regressor`.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from detkit.config import ranged
from detkit.data.images import to_chw_tensor
from detkit.feature_cache import FeatureCache, FeatureCacheError
from detkit.models.roi_heads import BoxPredictor
from detkit.ops import BoxCoder, box_iou

log = logging.getLogger(__name__)

POOLED = "pool5"  # the flattened output of the RoI feature extractor (pool5 for AlexNet / VGG)
VECTORS = "fc7"  # the output of the backbone's RoI head (fc7 for AlexNet / VGG)
NEVER_FIRES_BIAS = -1e4  # bias of a class without positives: its SVM never scores above any threshold

_UNFITTED = "the SVMs of this R-CNN are not trained: run the SVM stage (detkit train ...)"


@dataclass
class SVMSettings:
    """The ``svm`` box predictor's config keys: the R-CNN post-hoc classifiers (Sec. 2.3, Appendix B) and box
    regressor (Appendix C)."""

    C: float = ranged(0.001, gt=0)  # liblinear's C, as in R-CNN
    positive_weight: float = ranged(2.0, gt=0)
    bias_multiplier: float = ranged(10.0, gt=0)
    neg_iou: float = ranged(0.3, ge=0, le=1)  # negatives: IoU < 0.3 with every ground truth of the class
    hard_thresh: float = -1.0001  # negatives scoring above this are hard
    evict_thresh: float = -1.2  # cached negatives scoring below this are dropped after a retrain
    retrain_limit: int = ranged(2000, ge=1)  # retrain a class's SVM once this many new hard negatives were mined
    rounds: int = ranged(1, ge=1)  # passes of hard-negative mining over the training set
    max_iter: int = ranged(10000, ge=1)  # liblinear iterations per fit
    tol: float = ranged(0.1, gt=0)  # liblinear's default stopping tolerance for the dual solver, as R-CNN ran it
    cache_dtype: str = "float32"  # float16 halves the feature cache (R-CNN's VOC cache is hundreds of GB)
    feature_norm: float = ranged(20.0, gt=0)  # features are scaled so their mean L2 norm is this
    ridge_lambda: float = ranged(1000.0, ge=0)
    ridge_min_iou: float = ranged(0.6, ge=0, le=1)  # box regression learns from proposals with IoU > 0.6


class SVMBoxHead(BoxPredictor):
    """Per-class linear SVMs and ridge box regressors as the predictor of the RoI heads.

    ``forward(vectors (R, D), pooled (R, P) | None) -> scores (R, K+1), deltas (R, 4(K+1))``:
    ``scores[:, k] = feature_scale * vectors @ svm_weight[k-1] + svm_bias[k-1]`` (SVM margins, not
    probabilities; column 0, background, is 0). ``deltas[:, 4k:4k+4]`` are the class-k regressor's
    predictions in the parametrisation of the RoI heads' :class:`~detkit.ops.BoxCoder` with
    ``box_coder_weights``: the regressor predicts R-CNN's raw targets (coder weights 1, 1, 1, 1), which
    are multiplied by the coder weights here. Deltas are 0 (boxes = proposals) for background, when
    ``pooled`` is None, when ``pooled_features`` is None or when the regressor was not fitted.

    Buffers (all saved in the state dict): ``svm_weight (K, D)``, ``svm_bias (K,)``, ``feature_scale ()``,
    ``reg_weight (K, P+1, 4)`` (last row: bias), ``reg_mean (K, 4)``, ``reg_std (K, 4)`` (target
    standardisation), ``pooled_scale ()`` (pool5 features are scaled to mean norm 20 too, as R-CNN did,
    so that lambda means the same for every backbone), ``fitted ()`` and ``regressor_fitted ()`` bools.
    """

    def __init__(self, in_features: int, num_classes: int, pooled_features: int | None = None,
                 box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)):
        super().__init__()
        if len(box_coder_weights) != 4:
            raise ValueError(f"box_coder_weights must have 4 values, got {list(box_coder_weights)}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.pooled_features = None if pooled_features is None else int(pooled_features)
        k, p = self.num_classes, self.pooled_features or 0
        self.register_buffer("svm_weight", torch.zeros(k, self.in_features))
        self.register_buffer("svm_bias", torch.zeros(k))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.register_buffer("reg_weight", torch.zeros(k, p + 1, 4))
        self.register_buffer("reg_mean", torch.zeros(k, 4))
        self.register_buffer("reg_std", torch.ones(k, 4))
        self.register_buffer("pooled_scale", torch.tensor(1.0))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("regressor_fitted", torch.tensor(False))
        self.register_buffer("coder_weights", torch.tensor([float(w) for w in box_coder_weights]), persistent=False)

    def forward(self, vectors: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.training and not bool(self.fitted):
            raise RuntimeError(_UNFITTED)
        x = vectors.flatten(1).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"SVMBoxHead expects {self.in_features}-d vectors, got shape {tuple(vectors.shape)}")
        svm_scores = self.feature_scale * (x @ self.svm_weight.T) + self.svm_bias
        scores = torch.cat([svm_scores.new_zeros(x.shape[0], 1), svm_scores], dim=1)
        deltas = x.new_zeros(x.shape[0], self.num_classes + 1, 4)
        if pooled is not None and self.pooled_features is not None and bool(self.regressor_fitted):
            deltas[:, 1:] = self.regress(pooled)
        return scores, deltas.view(x.shape[0], 4 * (self.num_classes + 1))

    def class_scores(self, class_logits: Tensor) -> Tensor:
        """SVM margins are thresholded and ranked as they are (no softmax)."""
        return class_logits.float()

    def regress(self, pooled: Tensor) -> Tensor:
        """``pooled (R, P)`` -> per-class deltas ``(R, K, 4)`` in the box coder's parametrisation."""
        p = pooled.flatten(1).float()
        if p.shape[1] != self.pooled_features:
            raise ValueError(f"SVMBoxHead's regressor expects {self.pooled_features}-d pooled features, "
                             f"got shape {tuple(pooled.shape)}")
        w = self.reg_weight[:, :-1]  # (K, P, 4)
        t = torch.einsum("rp,kpc->rkc", self.pooled_scale * p, w) + self.reg_weight[:, -1]
        return (t * self.reg_std + self.reg_mean) * self.coder_weights

    @torch.no_grad()
    def set_svms(self, weight: np.ndarray | Tensor, bias: np.ndarray | Tensor, feature_scale: float) -> None:
        """Load trained SVMs: ``weight (K, D)``, ``bias (K,)`` for features multiplied by ``feature_scale``."""
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        if weight.shape != self.svm_weight.shape or bias.shape != self.svm_bias.shape:
            raise ValueError(f"SVM weights of shape {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit a "
                             f"head of {self.num_classes} classes on {self.in_features}-d features")
        self.svm_weight.copy_(weight)
        self.svm_bias.copy_(bias)
        self.feature_scale.fill_(float(feature_scale))
        self.fitted.fill_(True)

    @torch.no_grad()
    def set_regressor(self, weight: np.ndarray | Tensor, mean: np.ndarray | Tensor, std: np.ndarray | Tensor,
                      pooled_scale: float) -> None:
        """Load ridge regressors: ``weight (K, P+1, 4)``, target ``mean``/``std (K, 4)``."""
        weight, mean, std = torch.as_tensor(weight), torch.as_tensor(mean), torch.as_tensor(std)
        if weight.shape != self.reg_weight.shape or mean.shape != self.reg_mean.shape or std.shape != mean.shape:
            raise ValueError(f"regressor of shape {tuple(weight.shape)} (mean {tuple(mean.shape)}, std "
                             f"{tuple(std.shape)}) does not fit reg_weight {tuple(self.reg_weight.shape)}")
        self.reg_weight.copy_(weight)
        self.reg_mean.copy_(mean)
        self.reg_std.copy_(std)
        self.pooled_scale.fill_(float(pooled_scale))
        self.regressor_fitted.fill_(True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, pooled_features={self.pooled_features}"


# --------------------------------------------------------------------------------------------- SVMs


def hard_negative_mining(scores: np.ndarray, is_negative: np.ndarray, hard_thresh: float) -> np.ndarray:
    """Which regions are hard negatives of which class: ``(n, K)`` bool.

    scores ``(n, K)``: the current SVMs' scores; is_negative ``(n, K)``: the region is a negative of the
    class (IoU < neg_iou with all its ground truth). Hard: a negative scoring above ``hard_thresh``
    (R-CNN: -1.0001, just outside the margin, so everything that is not yet a zero-loss negative).
    """
    return is_negative & (scores > hard_thresh)


def _fit_one_svm(x_pos: np.ndarray, x_neg: np.ndarray, C: float, positive_weight: float, bias_multiplier: float,
                 max_iter: int, name: str, tol: float = 0.1) -> tuple[np.ndarray, float, dict]:
    """liblinear L2-regularised hinge-loss SVM (``-s 3 -w1 positive_weight -B bias_multiplier``), stopping
    at liblinear's own default tolerance for the dual solver (0.1, what R-CNN ran; scikit-learn's default
    1e-4 is far stricter and much slower on large hard-negative sets)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([x_pos, x_neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(x_pos), np.int64), np.zeros(len(x_neg), np.int64)])
    svm = LinearSVC(loss="hinge", C=C, class_weight={1: positive_weight, 0: 1.0}, intercept_scaling=bias_multiplier,
                    dual=True, fit_intercept=True, max_iter=max_iter, tol=tol, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("SVM of class %r: liblinear did not converge in %d iterations", name, max_iter)
    w, b = svm.coef_[0].astype(np.float64), float(svm.intercept_[0])
    z = x @ w + b
    pos_loss = C * positive_weight * float(np.maximum(0.0, 1.0 - z[: len(x_pos)]).sum())
    neg_loss = C * float(np.maximum(0.0, 1.0 + z[len(x_pos):]).sum())
    # liblinear regularises the bias as a weight on a constant feature of value bias_multiplier.
    reg = 0.5 * (float(w @ w) + (b / bias_multiplier) ** 2)
    return w, b, {"objective": reg + pos_loss + neg_loss, "pos_loss": pos_loss, "neg_loss": neg_loss, "reg": reg}


def train_linear_svms(cache: FeatureCache, classes: Sequence[str], *, C: float = 0.001, positive_weight: float = 2.0,
                      bias_multiplier: float = 10.0, neg_iou: float = 0.3, hard_thresh: float = -1.0001,
                      evict_thresh: float = -1.2, retrain_limit: int = 2000, rounds: int = 1,
                      feature_scale: float = 1.0, feature: str = VECTORS, chunk_rows: int = 2048,
                      max_iter: int = 10000, tol: float = 0.1,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One linear SVM per class by hard negative mining over the cache (R-CNN Appendix B).

    classes: the K class names (label k is ``classes[k - 1]``). Positives of class k: rows with
    ``gt_label == k`` (ground-truth boxes only). Negatives: rows with ``gt_label != k`` and
    ``overlaps[:, k-1] < neg_iou`` (proposals and ground truth of other classes, as in R-CNN). Features
    are multiplied by ``feature_scale``. The cache is read in chunks of ``chunk_rows`` rows (about one
    image's proposals, R-CNN's unit) for ``rounds`` passes; the SVMs start at zero, so the first chunks'
    negatives are all hard; a class is retrained once more than ``retrain_limit`` new hard negatives
    arrived, then its cached negatives scoring below ``evict_thresh`` are evicted; every class is retrained
    at the end. A class without positives is warned about and gets weight 0 and bias ``NEVER_FIRES_BIAS``:
    it never produces a detection.

    Returns ``weight (K, D)`` float32, ``bias (K,)`` float32 (for scaled features) and per-class statistics
    (``positives``, ``negatives`` in the final cache, ``hard_negatives`` mined in all, ``retrains``,
    ``objective``, ``pos_loss``, ``neg_loss``, ``reg``: liblinear's primal objective and its terms).
    """
    num_classes = len(classes)
    if cache.num_classes != num_classes:
        raise FeatureCacheError(f"{cache.path}: the cache has {cache.num_classes} classes, {num_classes} names given")
    feats = cache.features(feature)
    gt_label = np.asarray(cache.gt_label)
    positives = _positive_examples(feats, gt_label, classes, feature_scale)
    svms = _MinedSVMs(classes, positives, feats.shape[1], C=C, positive_weight=positive_weight,
                      bias_multiplier=bias_multiplier, max_iter=max_iter, tol=tol, evict_thresh=evict_thresh)
    _mine_hard_negatives(svms, cache, feats, gt_label, feature_scale=feature_scale, neg_iou=neg_iou,
                         hard_thresh=hard_thresh, retrain_limit=retrain_limit, rounds=rounds, chunk_rows=chunk_rows,
                         progress=progress)
    svms.final_fit()
    return svms.weight.astype(np.float32), svms.bias.astype(np.float32), svms.stats


def _positive_examples(feats: np.ndarray, gt_label: np.ndarray, classes: Sequence[str],
                       feature_scale: float) -> list[np.ndarray]:
    """Each class's positives: the scaled features ``(n_k, D)`` float32 of its ground-truth rows.

    feats ``(N, D)`` (a memmap), gt_label ``(N,)``: 0 for proposals, the class (1..K) for ground truth.
    A class without positives is warned about; its entry is ``(0, D)``.
    """
    positives = []
    for k in range(len(classes)):
        rows = np.flatnonzero(gt_label == k + 1)
        positives.append(np.asarray(feats[rows], np.float32) * np.float32(feature_scale))
        if not len(rows):
            log.warning("SVM of class %r: no positive examples; it will never fire", classes[k])
    return positives


class _MinedSVMs:
    """The K SVMs of :func:`train_linear_svms` while they are trained, and each one's negative cache.

    ``weight (K, D)``, ``bias (K,)`` float64: the current SVMs, for scaled features; ``stats``: the per-class
    statistics :func:`train_linear_svms` returns. Per class k, ``neg_rows[k] (n_k,)`` cache rows and
    ``neg_feats[k] (n_k, D)`` float32 scaled features: the negatives kept at its last retrain;
    ``new_rows[k]``, ``new_feats[k]``: the hard negatives mined since (``since_retrain[k]`` of them).
    ``active (K,)``: the classes that have positives; only those are mined and trained.
    """

    def __init__(self, classes: Sequence[str], positives: list[np.ndarray], dim: int, *, C: float,
                 positive_weight: float, bias_multiplier: float, max_iter: int, tol: float, evict_thresh: float):
        num_classes = len(classes)
        self.classes, self.positives = classes, positives
        self.C, self.positive_weight, self.bias_multiplier = C, positive_weight, bias_multiplier
        self.max_iter, self.tol, self.evict_thresh = max_iter, tol, evict_thresh
        self.weight = np.zeros((num_classes, dim), np.float64)
        self.bias = np.zeros(num_classes, np.float64)
        self.stats = [{"class": str(name), "positives": len(positives[k]), "negatives": 0, "hard_negatives": 0,
                       "retrains": 0, "objective": float("nan"), "pos_loss": float("nan"),
                       "neg_loss": float("nan"), "reg": float("nan")} for k, name in enumerate(classes)]
        for k in range(num_classes):
            if not len(positives[k]):
                self.bias[k] = NEVER_FIRES_BIAS  # scores below hard_thresh: nothing is mined for it either
        self.active = np.asarray([len(p) > 0 for p in positives])
        self.neg_rows = [np.zeros(0, np.int64) for _ in range(num_classes)]
        self.neg_feats = [np.zeros((0, dim), np.float32) for _ in range(num_classes)]
        # Kept as lists, so adding a chunk's hard negatives does not copy the cache.
        self.new_rows: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.new_feats: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.since_retrain = np.zeros(num_classes, np.int64)

    def cached_rows(self, k: int) -> np.ndarray:
        """The cache rows ``(n,)`` of every negative class k holds, kept or newly mined."""
        return np.concatenate([self.neg_rows[k], *self.new_rows[k]])

    def add(self, k: int, rows: np.ndarray, feats: np.ndarray) -> None:
        """Add hard negatives of class k: cache ``rows (n,)`` and their scaled ``feats (n, D)``."""
        self.new_rows[k].append(rows)
        self.new_feats[k].append(feats)
        self.since_retrain[k] += len(rows)
        self.stats[k]["hard_negatives"] += len(rows)

    def retrain(self, k: int) -> None:
        """Refit class k's SVM on its positives and all its cached negatives, then evict the easy ones
        (scoring below ``evict_thresh``). Without negatives it gets weight 0 and ``NEVER_FIRES_BIAS``."""
        self.neg_rows[k] = np.concatenate([self.neg_rows[k], *self.new_rows[k]])
        self.neg_feats[k] = np.concatenate([self.neg_feats[k], *self.new_feats[k]])
        self.new_rows[k], self.new_feats[k] = [], []
        self.since_retrain[k] = 0
        if not len(self.neg_feats[k]):
            log.warning("SVM of class %r: no negative examples; it will never fire", self.classes[k])
            self.weight[k], self.bias[k] = 0.0, NEVER_FIRES_BIAS
            return
        w, b, fit_stats = _fit_one_svm(self.positives[k], self.neg_feats[k], self.C, self.positive_weight,
                                       self.bias_multiplier, self.max_iter, str(self.classes[k]), self.tol)
        self.weight[k], self.bias[k] = w, b
        keep = self.neg_feats[k] @ w.astype(np.float32) + np.float32(b) >= self.evict_thresh
        self.neg_rows[k], self.neg_feats[k] = self.neg_rows[k][keep], self.neg_feats[k][keep]
        self.stats[k].update(fit_stats, retrains=self.stats[k]["retrains"] + 1)

    def final_fit(self) -> None:
        """Retrain every active class that mined negatives since its last fit (or was never fitted), and
        record the size of each final negative cache in ``stats``."""
        for k in np.flatnonzero(self.active):
            if self.since_retrain[k] or not self.stats[k]["retrains"]:
                self.retrain(k)
        for k in range(len(self.classes)):
            self.stats[k]["negatives"] = len(self.neg_rows[k])


def _mine_hard_negatives(svms: _MinedSVMs, cache: FeatureCache, feats: np.ndarray, gt_label: np.ndarray, *,
                         feature_scale: float, neg_iou: float, hard_thresh: float, retrain_limit: int, rounds: int,
                         chunk_rows: int, progress: bool) -> None:
    """``rounds`` passes over the cache in chunks of ``chunk_rows`` rows, scoring each chunk with the current
    ``svms`` and adding its hard negatives (:func:`hard_negative_mining`) to their caches; a class is
    retrained as soon as more than ``retrain_limit`` new ones came in.

    feats ``(N, D)`` (a memmap, scaled by ``feature_scale`` here), gt_label ``(N,)``; a region is a negative
    of class k when it is not its ground truth and ``overlaps[:, k-1] < neg_iou``.
    """
    from tqdm import tqdm

    starts = range(0, cache.num_rows, chunk_rows)
    bar = tqdm(total=rounds * len(starts), desc="svm hard negatives", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    class_labels = np.arange(1, len(svms.classes) + 1)
    for round_index in range(rounds):
        for start in starts:
            stop = min(cache.num_rows, start + chunk_rows)
            x = np.asarray(feats[start:stop], np.float32) * np.float32(feature_scale)
            scores = x @ svms.weight.T.astype(np.float32) + svms.bias.astype(np.float32)
            is_negative = ((gt_label[start:stop, None] != class_labels)
                           & (np.asarray(cache.overlaps[start:stop]) < neg_iou) & svms.active)
            hard = hard_negative_mining(scores, is_negative, hard_thresh)
            for k in np.flatnonzero(hard.any(axis=0)):
                idx = np.flatnonzero(hard[:, k])
                if round_index > 0:  # later passes see rows that may still be cached
                    idx = idx[~np.isin(start + idx, svms.cached_rows(k))]
                svms.add(k, start + idx, x[idx])
                if svms.since_retrain[k] > retrain_limit:
                    svms.retrain(k)
            bar.update(1)
    bar.close()


# ------------------------------------------------------------------------------------- box regressor


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


# ------------------------------------------------------------------------------------ the whole stage


def region_overlaps(regions: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> dict[str, Tensor]:
    """What the cache stores about ``regions (n, 4)`` given an image's ``gt_boxes (G, 4)``, ``gt_labels (G,)``.

    Returns ``overlaps (n, K)`` (max IoU with the ground truth of each class), ``matched_gt (n, 4)``,
    ``matched_label (n,)``, ``matched_iou (n,)`` (the ground truth of highest IoU, any class; without
    ground truth: the region itself, label 0, IoU 0).
    """
    n = regions.shape[0]
    overlaps = regions.new_zeros(n, num_classes)
    if gt_boxes.shape[0] == 0:
        return {"overlaps": overlaps, "matched_gt": regions.clone(), "matched_iou": regions.new_zeros(n),
                "matched_label": torch.zeros(n, dtype=torch.int64)}
    iou = box_iou(regions, gt_boxes)  # (n, G)
    overlaps.scatter_reduce_(1, (gt_labels - 1).expand(n, -1), iou, reduce="amax")
    matched_iou, j = iou.max(dim=1)
    return {"overlaps": overlaps, "matched_gt": gt_boxes[j], "matched_iou": matched_iou,
            "matched_label": gt_labels[j]}


def _write_cache(model: nn.Module, dataset, proposals_fn: Callable[[int], np.ndarray], path: Path,
                 dims: dict[str, int], num_classes: int, device: torch.device, fingerprint: str,
                 regions_per_call: int, dtype: str, progress: bool) -> None:
    """One pass over the dataset: ground truth + proposals of each image -> features -> cache."""
    from tqdm import tqdm

    with FeatureCache.create(path, dims, dtype, num_classes, fingerprint, overwrite=True) as writer:
        for i in tqdm(range(len(dataset)), desc="region features", disable=not progress, dynamic_ncols=True,
                      mininterval=1.0):
            ann = dataset.annotations(i)
            # R-CNN (VOC) leaves difficult objects out of SVM and regressor training; crowds are no objects.
            keep = ~(np.asarray(ann["iscrowd"], bool) | np.asarray(ann["difficult"], bool))
            gt_boxes = torch.as_tensor(np.asarray(ann["boxes"], np.float32).reshape(-1, 4)[keep])
            gt_labels = torch.as_tensor(np.asarray(ann["labels"], np.int64)[keep])
            if gt_labels.numel() and (gt_labels.min() < 1 or gt_labels.max() > num_classes):
                raise ValueError(f"image {i}: labels must be in 1..{num_classes}, got {gt_labels.tolist()}")
            proposals = np.asarray(proposals_fn(i), np.float32)
            if proposals.ndim != 2 or proposals.shape[1] != 4:
                raise ValueError(f"image {i}: proposals_fn returned shape {proposals.shape}, expected (N, 4)")
            regions = torch.cat([gt_boxes, torch.from_numpy(proposals)])
            gt_label = torch.cat([gt_labels, torch.zeros(len(proposals), dtype=torch.int64)])
            meta = region_overlaps(regions, gt_boxes, gt_labels, num_classes)
            image = dataset[i][0]
            image = to_chw_tensor(image, device)
            if regions.shape[0] == 0:
                writer.append(i, {k: np.zeros((0, d), np.float32) for k, d in dims.items()}, regions.numpy(),
                              gt_label.numpy(), **{k: v.numpy() for k, v in meta.items()})
            for s in range(0, regions.shape[0], regions_per_call):
                chunk = slice(s, s + regions_per_call)
                pooled, vectors = model.extract_region_features([image], [regions[chunk].to(device)])
                out = {VECTORS: vectors, POOLED: pooled}
                writer.append(i, {k: out[k].flatten(1).float().cpu().numpy() for k in dims},
                              regions[chunk].numpy(), gt_label[chunk].numpy(),
                              **{k: v[chunk].numpy() for k, v in meta.items()})


def fit_svm_head(model: nn.Module, dataset, proposals_fn: Callable[[int], np.ndarray], head: SVMBoxHead,
                 work_dir: str | Path, device: str | torch.device, cfg: SVMSettings | None = None, *,
                 fingerprint: str, class_names: Sequence[str] | None = None, regions_per_call: int = 256,
                 cache_dtype: str | None = None, progress: bool = True) -> dict:
    """The R-CNN stage after fine-tuning: region features, SVMs, box regressor, loaded into ``head``.

    model: implements ``extract_region_features(images, proposals) -> (pooled (n, P), vectors (n, D))``;
    dataset: transform-free, ``len``, ``dataset[i] -> (image (H, W, 3) uint8, target)`` and
    ``annotations(i)`` (boxes, labels 1..K, difficult, iscrowd); proposals_fn(i): ``(N, 4)`` xyxy in
    original-image pixels. (1) For every image, its ground truth (crowd and difficult objects left out)
    and proposals go through the model ``regions_per_call`` at a time into a feature cache at
    ``work_dir/features``; a complete cache with the same ``fingerprint`` is reused, a cache for other
    settings is rebuilt. (2) Features are scaled to mean norm ``cfg.feature_norm`` (fc7 for the SVMs,
    pool5 for the regressor). (3) :func:`train_linear_svms`, (4) :func:`train_box_regressor` (when
    ``head.pooled_features`` is set), (5) both are loaded into ``head``.

    Returns statistics: cache path and reuse, rows, scales, per-class SVM and regressor statistics and
    the seconds each step took.
    """
    cfg = cfg or SVMSettings()
    cache_dtype = cache_dtype or cfg.cache_dtype
    device = torch.device(device)
    num_classes = head.num_classes
    names = list(class_names or getattr(dataset, "class_names", None) or
                 [f"class {k}" for k in range(1, num_classes + 1)])
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a head of {num_classes} classes")
    dims = {VECTORS: head.in_features}
    if head.pooled_features is not None:
        dims[POOLED] = head.pooled_features
    path = Path(work_dir) / "features"
    stats: dict = {"cache": str(path), "seconds": {}}
    t0 = time.perf_counter()
    cache, reused = _region_feature_cache(model, dataset, proposals_fn, path, dims, num_classes, device,
                                          fingerprint, regions_per_call, cache_dtype, progress)
    stats.update(reused_cache=reused, num_rows=cache.num_rows)
    stats["seconds"]["features"] = time.perf_counter() - t0

    scales = _feature_scales(cache, dims, cfg.feature_norm)
    stats["feature_scale"] = scales[VECTORS]

    t0 = time.perf_counter()
    stats["svm"] = _fit_svms(head, cache, names, cfg, scales[VECTORS], progress)
    stats["seconds"]["svm"] = time.perf_counter() - t0
    for s in stats["svm"]:
        log.info("SVM %-16s positives %6d  negatives %7d (mined %7d)  objective %.4f", s["class"], s["positives"],
                 s["negatives"], s["hard_negatives"], s["objective"])

    if POOLED in dims:
        t0 = time.perf_counter()
        reg_stats = _fit_box_regressors(head, cache, names, cfg, scales[POOLED], device)
        stats.update(pooled_scale=scales[POOLED], regressor=reg_stats)
        stats["seconds"]["regressor"] = time.perf_counter() - t0
    return stats


def _region_feature_cache(model: nn.Module, dataset, proposals_fn: Callable[[int], np.ndarray], path: Path,
                          dims: dict[str, int], num_classes: int, device: torch.device, fingerprint: str,
                          regions_per_call: int, cache_dtype: str, progress: bool) -> tuple[FeatureCache, bool]:
    """The region feature cache at ``path``, and whether it was reused: a complete cache with this
    ``fingerprint`` is opened as it is, anything else there is rebuilt by :func:`_write_cache` with ``model``
    in eval mode (its mode is restored). Raises :class:`FeatureCacheError` when the cache's feature ``dims``
    (name -> width) or number of classes differ from the head's."""
    reused = FeatureCache.exists(path, fingerprint)
    if reused:
        log.info("%s: reusing the region feature cache (fingerprint %r)", path, fingerprint)
    else:
        if path.exists():
            log.warning("%s: the feature cache was made with other settings or is unreadable; rebuilding it", path)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                _write_cache(model, dataset, proposals_fn, path, dims, num_classes, device, fingerprint,
                             regions_per_call, cache_dtype, progress)
        finally:
            model.train(was_training)
    cache = FeatureCache.open(path, fingerprint)
    if any(cache.dims.get(k) != d for k, d in dims.items()) or cache.num_classes != num_classes:
        raise FeatureCacheError(f"{path}: the cache holds {cache.dims} for {cache.num_classes} classes; the head "
                                f"needs {dims} for {num_classes}: use another fingerprint or delete the cache")
    return cache, reused


def _feature_scales(cache: FeatureCache, features: Iterable[str], feature_norm: float) -> dict[str, float]:
    """Feature name -> the factor that scales the cache's features of that name to mean L2 norm
    ``feature_norm`` (R-CNN Sec. 2.3: 20 for fc7; pool5 likewise, so that lambda means the same for every
    backbone). Raises :class:`FeatureCacheError` for features of mean norm 0."""
    scales = {}
    for name in features:
        norm = cache.mean_norm(name)
        if not norm > 0:
            raise FeatureCacheError(f"{cache.path}: the {name} features have mean norm {norm}; cannot scale them")
        scales[name] = feature_norm / norm
    return scales


def _fit_svms(head: SVMBoxHead, cache: FeatureCache, names: list[str], cfg: SVMSettings, feature_scale: float,
              progress: bool) -> list[dict]:
    """:func:`train_linear_svms` with ``cfg``'s settings on the fc7 features scaled by ``feature_scale``;
    loads the SVMs into ``head`` and returns their per-class statistics."""
    weight, bias, svm_stats = train_linear_svms(
        cache, names, C=cfg.C, positive_weight=cfg.positive_weight, bias_multiplier=cfg.bias_multiplier,
        neg_iou=cfg.neg_iou, hard_thresh=cfg.hard_thresh, evict_thresh=cfg.evict_thresh,
        retrain_limit=cfg.retrain_limit, rounds=cfg.rounds, feature_scale=feature_scale, max_iter=cfg.max_iter,
        tol=cfg.tol, progress=progress)
    head.set_svms(weight, bias, feature_scale)
    return svm_stats


def _fit_box_regressors(head: SVMBoxHead, cache: FeatureCache, names: list[str], cfg: SVMSettings,
                        pooled_scale: float, device: torch.device) -> list[dict]:
    """:func:`train_box_regressor` with ``cfg``'s settings on the pool5 features scaled by ``pooled_scale``;
    loads the regressors into ``head`` and returns their per-class statistics."""
    # float64 solves: on CUDA when there is one, CPU otherwise (MPS has no float64).
    solve_device = device if device.type == "cuda" else torch.device("cpu")
    reg_weight, reg_mean, reg_std, reg_stats = train_box_regressor(
        cache, head.num_classes, cfg.ridge_lambda, cfg.ridge_min_iou, classes=names, pooled_scale=pooled_scale,
        device=solve_device)
    head.set_regressor(reg_weight, reg_mean, reg_std, pooled_scale)
    return reg_stats
