"""COCO metric: hand-computed cases, both backends identical, bad results files."""
import numpy as np
import pytest

from detkit.evaluation import detections_to_coco_results, evaluate_coco, format_metrics_table


def gt_dict(boxes_per_image, crowd=()):
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 200, "width": 200})
        for (x, y, w, h, cat) in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    for (img, x, y, w, h, cat) in crowd:
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 1})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}


def det(img, x, y, w, h, cat, score):
    return {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score}


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_perfect_and_partial_overlap(backend):
    gt = gt_dict([[(10, 10, 100, 100, 5)]])
    m = evaluate_coco(gt, [det(1, 10, 10, 100, 100, 5, 0.9)], backend=backend)
    assert m["AP"] == pytest.approx(1.0) and m["per_class"]["a"] == pytest.approx(1.0)
    assert m["per_class"]["b"] == -1.0  # no ground truth for class b
    # IoU 0.6 exactly: matched at thresholds 0.50, 0.55, 0.60 -> AP = 3/10.
    m = evaluate_coco(gt, [det(1, 10, 10, 60, 100, 5, 0.9)], backend=backend)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0 and m["AP"] == pytest.approx(0.3)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_false_positive_ranked_first(backend):
    # Two gts; detections by score: FP, TP1, TP2. Precision at recall 0.5 is 1/2, at recall 1.0 is 2/3;
    # interpolated precision is 2/3 for every recall point in [0, 1] -> AP = 2/3 at every IoU threshold.
    gt = gt_dict([[(0, 0, 50, 50, 5), (100, 100, 50, 50, 5)]])
    dets = [det(1, 150, 0, 40, 40, 5, 0.9), det(1, 0, 0, 50, 50, 5, 0.8), det(1, 100, 100, 50, 50, 5, 0.7)]
    m = evaluate_coco(gt, dets, backend=backend)
    assert m["AP"] == pytest.approx(2 / 3, abs=1e-9)


def test_backends_agree_on_a_busy_case():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        boxes = []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 60, 2)
            boxes.append((x, y, w, h, int(rng.choice([5, 9]))))
        images.append(boxes)
    gt = gt_dict(images, crowd=[(1, 0, 0, 80, 80, 9), (3, 100, 100, 90, 90, 5)])
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.8:  # found, with jitter; some duplicates
            x, y, w, h = ann["bbox"]
            for _ in range(rng.integers(1, 3)):
                j = rng.normal(0, 4, 4)
                dets.append(det(ann["image_id"], x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3]),
                                ann["category_id"], float(rng.random())))
    for _ in range(15):  # background false positives
        dets.append(det(int(rng.integers(1, 7)), *rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2),
                        int(rng.choice([5, 9])), float(rng.random())))
    a = evaluate_coco(gt, dets, backend="faster_coco_eval")
    b = evaluate_coco(gt, dets, backend="pycocotools")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    assert a["per_class"] == pytest.approx(b["per_class"], abs=1e-12)
    assert 0 < a["AP"] < 1
    assert "AP50" in format_metrics_table(a) and "b " in format_metrics_table(a)


def test_empty_results_and_foreign_results():
    gt = gt_dict([[(10, 10, 100, 100, 5)]])
    assert evaluate_coco(gt, [])["AP"] == 0.0
    with pytest.raises(ValueError, match="image_id 77"):
        evaluate_coco(gt, [det(77, 0, 0, 5, 5, 5, 0.5)])
    with pytest.raises(ValueError, match="category_id 1 "):
        evaluate_coco(gt, [det(1, 0, 0, 5, 5, 1, 0.5)])
    with pytest.raises(ValueError, match="backend 'nope'"):
        evaluate_coco(gt, [], backend="nope")


def test_detections_to_results_maps_category_ids():
    import torch

    out = detections_to_coco_results(4, {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]),
                                         "scores": torch.tensor([0.5]), "labels": torch.tensor([2])}, [5, 9])
    assert out == [{"image_id": 4, "category_id": 9, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
