"""Evaluating a detector on a dataset: predictions for every image (sharded over the processes under
``torchrun``), scored by the COCO box metric or PASCAL VOC AP, with the results, the metrics and the error
report written next to them."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from detkit.config import Config, ConfigError
from detkit.data.loading import build_dataset, to_tensor_batch
from detkit.engine.distributed import DistInfo, gather_objects
from detkit.evaluation.coco_eval import (DEFAULT_MAX_DETECTIONS, detections_to_coco_results, evaluate_coco,
                                         format_metrics_table, images_over_cap)
from detkit.evaluation.voc_eval import evaluate_voc, format_voc_table
from detkit.models.roi_heads import detections_capped
from detkit.models.tiling import tiled
from detkit.proposals.attach import attach_proposals

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset, device: torch.device, batch_size: int = 1,
                    num_workers: int = 0, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Detections for the images of ``dataset`` (those of ``shard = (rank, world_size)``),
    in original-image coordinates, on the CPU."""
    rank, world = shard
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=to_tensor_batch)
    model.eval()
    outputs: list[dict] = []
    iterator = loader
    if progress:
        from detkit.engine.progress import progress_bar

        iterator = progress_bar(loader, desc="eval")
    for images, targets, proposals in iterator:
        if proposals is not None:
            proposals = [p.to(device) for p in proposals]
        dets = model([img.to(device) for img in images], None, proposals)
        for det, target in zip(dets, targets):
            outputs.append({"image_id": int(target["image_id"]), **{k: v.cpu() for k, v in det.items()}})
    return outputs


def evaluate(model: nn.Module, cfg: Config, registries, device: torch.device, out_dir: str,
             dataset=None, progress: bool = True, dist_info: DistInfo | None = None) -> dict | None:
    """COCO-style evaluation on ``data.test`` (or ``dataset``); writes ``metrics.json`` and results JSON.
    With ``eval.tile.size > 0`` the model sees each image in overlapping windows (:mod:`detkit.models.tiling`).

    The detector returns at most ``eval.max_detections`` detections per image while it is evaluated, and as
    many count (COCO's maxDets). Under torch.distributed each rank predicts a shard; rank 0 gathers, scores and
    writes (other ranks return None).
    """
    if dataset is None:
        dataset = build_dataset(cfg.data.test, registries, "test")
    results = predict_results(model, cfg, registries, device, dataset, progress, dist_info)
    if results is None:
        return None
    return score_and_write(dataset, results, out_dir, cfg.eval.metric, cfg.eval.backend, list(dataset.class_names),
                           max_detections=cfg.eval.max_detections, detector_capped=True)


def predict_results(model: nn.Module, cfg: Config, registries, device: torch.device, dataset, progress: bool = True,
                    dist_info: DistInfo | None = None) -> list[dict] | None:
    """The COCO results of ``model`` on ``dataset`` as :func:`evaluate` makes them (tiling, proposals, the cap of
    ``eval.max_detections``, ``eval.score_thresh``): every rank predicts its shard, rank 0 gets them all (None
    elsewhere)."""
    info = dist_info or DistInfo()
    if len(dataset) == 0:
        raise ConfigError("data.test: the dataset has no images")
    cat_ids = label_categories(list(cfg.model.class_names or []), list(dataset.class_names), list(dataset.cat_ids))
    # eval.tile.size > 0: each image in overlapping windows (detkit.models.tiling); a window's proposals are made from
    # the window, so per-image proposal caches are not attached.
    detector = tiled(model, cfg.eval.tile, progress=progress and info.is_main)
    if detector is model:
        attach_proposals(dataset, model, progress, info)
    cap = cfg.eval.max_detections
    with detections_capped(detector, cap) as heads:
        if not heads and info.is_main:
            _check_fixed_cap(detector, cap)
        predictions = predict_dataset(detector, dataset, device, batch_size=1, num_workers=cfg.data.num_workers,
                                      progress=progress and info.is_main, shard=(info.rank, info.world_size))
    predictions = [p for part in gather_objects(predictions, info) for p in part]
    if not info.is_main:
        return None
    return _coco_results(predictions, cfg.eval.score_thresh, cat_ids)


def _check_fixed_cap(detector, cap: int) -> None:
    """Warn when a detector whose cap eval.max_detections cannot set (an exported file) keeps fewer."""
    inner = getattr(detector, "detector", detector)  # a tiled run merges the windows' detections uncapped
    fixed = getattr(inner, "max_detections", None)
    if inner is detector and fixed is not None and fixed < cap:
        log.warning("eval.max_detections=%d, but %s keeps at most %d detections per image (fixed when it was "
                    "written): figures are capped there", cap, getattr(inner, "path", type(inner).__name__), fixed)


def label_categories(model_names: list[str], dataset_names: list[str], dataset_cat_ids: list[int]) -> list[int | None]:
    """The dataset's category id of each model label ``1..K`` (``[k - 1]``), matched by class name, None
    for a model class the dataset does not have (its detections are not scored): a model trained on more
    classes (torchvision's 91-slot COCO layout against an 80-class COCO json) evaluates on the shared ones.
    Raises ConfigError naming the dataset classes the model lacks."""
    if model_names == dataset_names:
        return list(dataset_cat_ids)
    missing = [n for n in dataset_names if n not in model_names]
    if missing:
        raise ConfigError(f"the evaluation dataset's classes {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                          f"are not among the model's {len(model_names)} classes {model_names[:10]}"
                          f"{' ...' if len(model_names) > 10 else ''} (classes are matched by name)")
    ids = dict(zip(dataset_names, dataset_cat_ids))
    return [ids.get(name) for name in model_names]


def _coco_results(predictions: list[dict], score_thresh: float | None, cat_ids: list[int | None]) -> list[dict]:
    """COCO result entries of ``predictions``, above ``score_thresh``, labels mapped by ``cat_ids``
    (:func:`label_categories`; labels mapped to None are dropped)."""
    scored = torch.tensor([c is not None for c in [None, *cat_ids]])
    results = []
    for det in predictions:
        keep = scored[det["labels"].long().clamp(0, len(cat_ids))]
        if score_thresh is not None:
            keep &= det["scores"] >= score_thresh
        det = {k: (v[keep] if torch.is_tensor(v) else v) for k, v in det.items()}
        results.extend(detections_to_coco_results(det["image_id"], det, cat_ids))
    return results


def score_and_write(dataset, results: list[dict], out_dir: str, metric: str, backend: str, names: list[str],
                    write_results: bool = True, max_detections: int | None = DEFAULT_MAX_DETECTIONS,
                    detector_capped: bool = False) -> dict:
    """Score COCO-format ``results`` on ``dataset``, write ``metrics.json`` and, with ``write_results``,
    ``results.json`` under ``out_dir``, then the report's pictures, then ``metrics.json`` again with the error
    report's figures; print the metrics table. ``max_detections``: the detections per image and class COCO
    counts and, with ``detector_capped``, per image the detector returned (recorded in the metrics; a warning
    names the images with more objects); None: no cap (VOC's metric of a results file made elsewhere)."""
    from detkit.engine.files import write_json_atomic
    from detkit.evaluation.reports import evaluation_report

    gt = dataset.to_coco()
    if max_detections is not None:
        warn_dense_images(gt, max_detections, per_class=not detector_capped)
    metrics = score_results(gt, results, metric, backend, names, max_detections or DEFAULT_MAX_DETECTIONS)
    if max_detections is not None:
        metrics["max_detections"] = int(max_detections)
    os.makedirs(out_dir, exist_ok=True)
    # The figures first: a picture that fails (or a process killed while drawing) leaves them written.
    if write_results:
        write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    metrics["errors"] = evaluation_report(dataset, gt, results, out_dir, names)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    print(format_metrics(metrics))
    return metrics


def results_by_file_name(results: list[dict], index: list, gt_images: list[dict], where: str) -> list[dict]:
    """``results`` whose ``image_id`` is an entry of ``index`` (``detkit infer``'s ``images.json``: ``{"id",
    "file_name"}`` per image, ids by position) with the ids the ground truth gives the images of the same file
    name (compared by base name). ValueError naming ``where`` and a few of the files the dataset lacks, an id
    the index lacks, or a name the dataset holds twice."""
    if not isinstance(index, list) or not all(isinstance(e, dict) and {"id", "file_name"} <= set(e) for e in index):
        raise ValueError(f"{where}: expected detkit infer's list of {{id, file_name, ...}}")
    by_id = {e["id"]: os.path.basename(str(e["file_name"])) for e in index}
    ids: dict[str, list] = {}
    for img in gt_images:
        ids.setdefault(os.path.basename(str(img.get("file_name", ""))), []).append(img["id"])
    unknown = sorted({str(r.get("image_id")) for r in results if r.get("image_id") not in by_id})
    if unknown:
        raise ValueError(f"image ids {', '.join(unknown[:5])} of the results are not in {where}")
    used = {by_id[r["image_id"]] for r in results}
    missing = sorted(name for name in used if name not in ids)
    if missing:
        raise ValueError(f"{len(missing)} of the {len(used)} images the results were made on (by {where}) are not "
                         f"in the dataset by file name: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    twice = sorted(name for name in used if len(ids[name]) > 1)
    if twice:
        raise ValueError(f"the dataset holds {', '.join(twice[:3])} more than once (in different folders): "
                         f"{where} cannot tell which image the results are for")
    return [{**r, "image_id": ids[by_id[r["image_id"]]][0]} for r in results]


def warn_dense_images(gt: dict, max_detections: int, per_class: bool = False) -> None:
    """Say which images have more objects (``per_class``: of one class) than the detections that count (their
    recall is capped)."""
    dense = images_over_cap(gt, max_detections, per_class)
    if dense:
        files = {img["id"]: img.get("file_name", img["id"]) for img in gt["images"]}
        most = ", ".join(f"{files.get(i, i)} ({n})" for i, n in dense[:3])
        log.warning("%d of %d images have more objects%s than eval.max_detections=%d (%s%s): recall on them is "
                    "capped; raise eval.max_detections (--max-detections)", len(dense), len(gt["images"]),
                    " of one class" if per_class else "", max_detections, most, ", ..." if len(dense) > 3 else "")


def score_results(gt: dict, results: list[dict], metric: str, backend: str = "faster_coco_eval",
                  class_names: list[str] | None = None, max_detections: int = DEFAULT_MAX_DETECTIONS) -> dict:
    """COCO or VOC metrics of COCO-format ``results`` against a COCO-format ground truth; COCO counts the
    ``max_detections`` best detections of each image, VOC all of them."""
    if metric == "coco":
        return {"metric": "coco", **evaluate_coco(gt, results, backend=backend, class_names=class_names,
                                                  max_detections=max_detections)}
    if metric in ("voc07", "voc"):
        return evaluate_voc(gt, results, metric=metric, class_names=class_names)
    raise ConfigError(f"eval.metric={metric!r}: expected coco, voc07 or voc")


def format_metrics(metrics: dict) -> str:
    """The metrics as the table of their kind (COCO or VOC)."""
    return format_voc_table(metrics) if metrics.get("metric") in ("voc07", "voc") else format_metrics_table(metrics)
