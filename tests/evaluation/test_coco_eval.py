"""COCO metric: hand-computed cases on both backends, backends identical on a busy case, bad inputs."""
import copy

import numpy as np
import pytest
import torch

from detkit.evaluation import detections_to_coco_results, evaluate_coco, format_metrics_table
from detkit.evaluation.coco_eval import STAT_NAMES

BACKENDS = ["faster_coco_eval", "pycocotools"]


def gt_dict(boxes_per_image, crowd=()):
    """Images 1..n of 200x200; ``boxes_per_image[i]`` holds (x, y, w, h, category) for image i + 1."""
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 200, "width": 200})
        for (x, y, w, h, cat) in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    for (img, x, y, w, h, cat) in crowd:
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 1})
    # Category ids deliberately not 1..K and not sorted: label order is the list order.
    return {"images": images, "annotations": anns,
            "categories": [{"id": 9, "name": "b"}, {"id": 5, "name": "a"}]}


def det(img, x, y, w, h, cat, score):
    return {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score}


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detection(backend):
    gt = gt_dict([[(10, 10, 100, 100, 5)]])
    m = evaluate_coco(gt, [det(1, 10, 10, 100, 100, 5, 0.9)], backend=backend)
    for key in ("AP", "AP50", "AP75", "APl", "AR1", "AR100", "ARl"):
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    assert m["APs"] == m["APm"] == m["ARs"] == m["ARm"] == -1.0  # no small/medium ground truth: undefined
    assert m["per_class"] == pytest.approx({"b": -1.0, "a": 1.0}, abs=1e-12)
    assert list(m["per_class"]) == ["b", "a"]  # gt["categories"] order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width, iou, matched_thresholds", [(62, 0.62, 3), (80, 0.80, 7), (52, 0.52, 1)])
def test_partial_overlap_counts_matching_thresholds(backend, width, iou, matched_thresholds):
    # One gt (10, 10, 100, 100), one detection sharing its left part: IoU = width / 100. It is a true
    # positive (precision 1 at recall 1) at every threshold in 0.50:0.05:0.95 that is <= IoU, a miss at
    # the others, so AP = (matching thresholds) / 10 and AR likewise.
    gt = gt_dict([[(10, 10, 100, 100, 5)]])
    m = evaluate_coco(gt, [det(1, 10, 10, width, 100, 5, 0.9)], backend=backend)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert m["AP75"] == pytest.approx(1.0 if iou >= 0.75 else 0.0, abs=1e-12)
    assert m["AP"] == pytest.approx(matched_thresholds / 10, abs=1e-12)
    assert m["AR100"] == pytest.approx(matched_thresholds / 10, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_first(backend):
    # Two gts; detections by score: FP, TP, TP. Precision after each: 0, 1/2, 2/3 at recall 0, 1/2, 1.
    # Interpolated precision (max over recall >= r) is 2/3 at all 101 recall points -> AP = 2/3.
    gt = gt_dict([[(0, 0, 50, 50, 5), (100, 100, 50, 50, 5)]])
    dets = [det(1, 150, 0, 40, 40, 5, 0.9), det(1, 0, 0, 50, 50, 5, 0.8), det(1, 100, 100, 50, 50, 5, 0.7)]
    m = evaluate_coco(gt, dets, backend=backend)
    assert m["AP"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["AR100"] == pytest.approx(1.0, abs=1e-12)
    assert m["AR1"] == pytest.approx(0.0, abs=1e-12)  # the single best detection per image is the FP


@pytest.mark.parametrize("backend", BACKENDS)
def test_interpolation_with_a_miss(backend):
    # Three gts, one never found; detections by score: TP, FP, TP.
    # precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3 -> interpolated 1 for r <= 1/3 (r = 0.00..0.33:
    # 34 points), 2/3 for 1/3 < r <= 2/3 (0.34..0.66: 33 points), 0 above (34 points).
    gt = gt_dict([[(0, 0, 50, 50, 5), (100, 100, 50, 50, 5), (0, 120, 50, 50, 5)]])
    dets = [det(1, 0, 0, 50, 50, 5, 0.9), det(1, 150, 0, 40, 40, 5, 0.8), det(1, 100, 100, 50, 50, 5, 0.7)]
    m = evaluate_coco(gt, dets, backend=backend)
    expected = (34 * 1.0 + 33 * (2 / 3)) / 101
    assert m["AP"] == pytest.approx(expected, abs=1e-12)
    assert m["per_class"]["a"] == pytest.approx(expected, abs=1e-12)
    assert m["AR100"] == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_region_neither_rewards_nor_penalises(backend):
    gt = gt_dict([[(0, 0, 50, 50, 5)]], crowd=[(1, 100, 100, 90, 90, 5)])
    hit = det(1, 0, 0, 50, 50, 5, 0.5)
    inside_crowd = det(1, 110, 110, 30, 30, 5, 0.9)  # would be a high-scoring FP without the crowd region
    assert evaluate_coco(gt, [hit, inside_crowd], backend=backend)["AP"] == pytest.approx(1.0, abs=1e-12)


def busy_case():
    """Several images and classes, small/medium/large objects, crowd regions, duplicates, misses and FPs."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(8):
        boxes = []
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 100, 2)
            w, h = rng.uniform(8, 110, 2)
            boxes.append((x, y, w, h, int(rng.choice([5, 9]))))
        images.append(boxes)
    gt = gt_dict(images, crowd=[(1, 0, 0, 80, 80, 9), (3, 100, 100, 90, 90, 5)])
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.8:  # found with jitter, sometimes twice (a duplicate is a FP); else a miss
            x, y, w, h = ann["bbox"]
            for _ in range(rng.integers(1, 3)):
                j = rng.normal(0, 4, 4)
                dets.append(det(ann["image_id"], x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3]),
                                ann["category_id"], float(rng.random())))
    for _ in range(20):  # background false positives
        dets.append(det(int(rng.integers(1, 9)), *rng.uniform(0, 150, 2), *rng.uniform(5, 80, 2),
                        int(rng.choice([5, 9])), float(rng.random())))
    return gt, dets


def test_backends_agree_on_a_busy_case():
    gt, dets = busy_case()
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    a = evaluate_coco(gt, dets, backend="faster_coco_eval")
    b = evaluate_coco(gt, dets, backend="pycocotools")
    assert gt == gt_before and dets == dets_before  # neither library wrote into the caller's dicts
    for key in STAT_NAMES:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
        assert 0 < a[key] < 1, key  # non-trivial: every size bucket is populated and imperfect
    assert a["per_class"] == pytest.approx(b["per_class"], abs=1e-12)
    # Per-class AP comes from the same precision array, so its mean is the overall AP.
    assert np.mean(list(a["per_class"].values())) == pytest.approx(a["AP"], abs=1e-12)
    table = format_metrics_table(a)
    assert "AP50" in table and "\nb " in table and f"{a['AP']:6.3f}" in table


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results(backend):
    gt = gt_dict([[(10, 10, 100, 100, 5), (0, 0, 20, 20, 9)]])
    m = evaluate_coco(gt, [], backend=backend)
    for key in ("AP", "AP50", "AP75", "APs", "APl", "AR1", "AR100", "ARs", "ARl"):
        assert m[key] == 0.0, key
    assert m["APm"] == -1.0  # no medium ground truth: undefined, as in pycocotools
    assert m["per_class"] == {"b": 0.0, "a": 0.0}
    assert "n/a" in format_metrics_table(m)


def test_foreign_and_malformed_results():
    gt = gt_dict([[(10, 10, 100, 100, 5)]])
    with pytest.raises(ValueError, match="image_id 77 .*another dataset"):
        evaluate_coco(gt, [det(1, 0, 0, 5, 5, 5, 0.5), det(77, 0, 0, 5, 5, 5, 0.5)])
    with pytest.raises(ValueError, match="result 0: category_id 1 .*another dataset"):
        evaluate_coco(gt, [det(1, 0, 0, 5, 5, 1, 0.5)])
    with pytest.raises(ValueError, match="bbox"):
        evaluate_coco(gt, [det(1, 0, 0, -5, 5, 5, 0.5)])
    with pytest.raises(ValueError, match="score"):
        evaluate_coco(gt, [det(1, 0, 0, 5, 5, 5, float("nan"))])
    with pytest.raises(ValueError, match="backend 'nope'"):
        evaluate_coco(gt, [], backend="nope")
    with pytest.raises(ValueError, match="class_names has 1 names .* 2 categories"):
        evaluate_coco(gt, [], class_names=["only"])
    with pytest.raises(ValueError, match="'annotations'"):
        evaluate_coco({"images": [], "categories": []}, [])


def test_class_names_follow_category_order():
    gt = gt_dict([[(10, 10, 100, 100, 5)]])
    m = evaluate_coco(gt, [det(1, 10, 10, 100, 100, 5, 0.9)], class_names=["bird", "apple"])
    assert m["per_class"] == pytest.approx({"bird": -1.0, "apple": 1.0}, abs=1e-12)


def test_detections_to_results_maps_category_ids():
    out = detections_to_coco_results(4, {"boxes": torch.tensor([[1.5, 2.25, 11.0, 22.0], [0, 0, 3, 3]]),
                                         "scores": torch.tensor([0.5, 0.25]), "labels": torch.tensor([2, 1])},
                                     [5, 9])
    assert out == [{"image_id": 4, "category_id": 9, "bbox": [1.5, 2.25, 9.5, 19.75], "score": 0.5},
                   {"image_id": 4, "category_id": 5, "bbox": [0.0, 0.0, 3.0, 3.0], "score": 0.25}]
    assert all(type(v) is float for r in out for v in [*r["bbox"], r["score"]])
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert detections_to_coco_results(1, empty, [5]) == []
    with pytest.raises(ValueError, match="label 0 outside 1..2"):
        detections_to_coco_results(1, {"boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [0]}, [5, 9])
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        detections_to_coco_results(1, {"boxes": [[0, 0, 1, 1]] * 2, "scores": [0.5], "labels": [1]}, [5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_detections_counts_more_detections_per_image(backend):
    """A scene with 150 objects found perfectly: COCO's 100 detections per image cap recall at 100/150; with
    max_detections 200 every one counts (issue 23, item 13)."""
    from detkit.evaluation.coco_eval import images_over_cap, stat_names

    boxes = [(13 * (k % 15), 13 * (k // 15), 10, 10, 5) for k in range(150)]
    gt = gt_dict([boxes, [(10, 10, 100, 100, 9)]])
    dets = [det(1, x, y, w, h, cat, 1 - k / 1000) for k, (x, y, w, h, cat) in enumerate(boxes)]
    dets.append(det(2, 10, 10, 100, 100, 9, 0.9))
    capped = evaluate_coco(gt, dets, backend=backend)
    assert capped["max_detections"] == 100 and capped["AR100"] == pytest.approx((100 / 150 + 1) / 2, abs=1e-12)
    assert capped["per_class"]["a"] < 0.7
    dense = evaluate_coco(gt, dets, backend=backend, max_detections=200)
    assert set(stat_names(200)) <= set(dense) and "AR100" not in dense
    assert dense["max_detections"] == 200 and dense["AP"] == dense["AR200"] == pytest.approx(1.0, abs=1e-12)
    assert dense["AR10"] == pytest.approx((10 / 150 + 1) / 2, abs=1e-12)
    table = format_metrics_table(dense)
    assert "AR200" in table and "maxDets=200" in table and "maxDets=100" not in table
    assert "maxDets=100" in format_metrics_table(capped)
    assert images_over_cap(gt, 100) == [(1, 150)] and images_over_cap(gt, 150) == []
    assert images_over_cap(gt, 100, per_class=True) == [(1, 150)]
    mixed = gt_dict([[(x, y, w, h, 5 if k % 2 else 9) for k, (x, y, w, h, _) in enumerate(boxes)]])
    assert images_over_cap(mixed, 100) == [(1, 150)] and images_over_cap(mixed, 100, per_class=True) == []
    with pytest.raises(ValueError, match="max_detections=5: expected an integer >= 10"):
        evaluate_coco(gt, dets, max_detections=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_is_the_libraries_own_at_100_detections(backend):
    """The numbers read out of the accumulated arrays are the ones the library's own summarize() prints."""
    from detkit.evaluation.coco_eval import _run, summary

    gt, dets = busy_case()
    ev = _run(gt, dets, backend, 100)
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        ev.summarize()
    assert summary(ev) == pytest.approx(list(ev.stats[:12]), abs=1e-15)
