"""R-CNN's linear SVMs trained by hard negative mining (Girshick et al. 2014, Sec. 2.3, Appendix B).

One linear SVM per class on fc7 features; positives are the ground-truth boxes of the class only,
negatives are regions whose IoU with every ground truth of the class is below 0.3. The negatives do not
fit in memory, so they are mined: the feature cache is scanned once, negatives scoring above -1.0001 are
added to a per-class cache, the SVM is retrained (liblinear, C = 0.001, positive loss weight 2, bias
feature 10) whenever enough new ones came in, and cached negatives scoring below -1.2 are evicted.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from detkit.models.feature_cache import FeatureCache, FeatureCacheError
from detkit.models.svm.head import NEVER_FIRES_BIAS, VECTORS

log = logging.getLogger(__name__)


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
    from detkit.engine.progress import progress_bar

    starts = range(0, cache.num_rows, chunk_rows)
    bar = progress_bar(total=rounds * len(starts), desc="svm hard negatives", enabled=progress)
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
