"""R-CNN's whole post-hoc stage after fine-tuning (Girshick et al. 2014, Sec. 2.3, Appendix B and C): the
region features of every training image into a :class:`~detkit.models.feature_cache.FeatureCache`, scaled to mean
L2 norm 20, then the SVMs (:func:`~detkit.models.svm.mining.train_linear_svms`) and the box regressors
(:func:`~detkit.models.svm.regressor.train_box_regressor`), loaded into the
:class:`~detkit.models.svm.head.SVMBoxHead`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from detkit.data.images import to_chw_tensor
from detkit.models.feature_cache import FeatureCache, FeatureCacheError
from detkit.models.svm.head import POOLED, VECTORS, SVMBoxHead, SVMSettings
from detkit.models.svm.mining import train_linear_svms
from detkit.models.svm.regressor import train_box_regressor
from detkit.ops import box_iou

log = logging.getLogger(__name__)


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
    from detkit.engine.progress import progress_bar

    with FeatureCache.create(path, dims, dtype, num_classes, fingerprint, overwrite=True) as writer:
        for i in progress_bar(range(len(dataset)), desc="region features", enabled=progress):
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
