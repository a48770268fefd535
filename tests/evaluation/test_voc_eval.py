"""VOC metric against an independent transcription of the devkit (VOCevaldet.m / VOCap.m), on hand-made
cases: ties, duplicates, difficult objects, classes without detections or without ground truth."""
import math

import numpy as np
import pytest

from detkit.evaluation.voc_eval import evaluate_voc


def devkit_ap(gt, dets, cls, use07):
    """Line-by-line transcription of the devkit, in its 1-based inclusive pixel coordinates."""
    npos = 0
    gtinfo = {}
    for img in gt["images"]:
        bbs = [(a["bbox"], a["iscrowd"]) for a in gt["annotations"] if a["image_id"] == img["id"]
               and a["category_id"] == cls]
        bb = [[b[0] + 1, b[1] + 1, b[0] + b[2], b[1] + b[3]] for b, _ in bbs]
        diff = [bool(d) for _, d in bbs]
        gtinfo[img["id"]] = {"BB": bb, "diff": diff, "det": [False] * len(bb)}
        npos += sum(1 for d in diff if not d)
    mine = [d for d in dets if d["category_id"] == cls]
    confidence = [d["score"] for d in mine]
    si = sorted(range(len(mine)), key=lambda i: -confidence[i])  # Python's sort is stable, like MATLAB's
    nd = len(mine)
    tp, fp = [0] * nd, [0] * nd
    for d in range(nd):
        det = mine[si[d]]
        x, y, w, h = det["bbox"]
        bb = [x + 1, y + 1, x + w, y + h]
        g = gtinfo[det["image_id"]]
        ovmax, jmax = -math.inf, -1
        for j, bbgt in enumerate(g["BB"]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                      - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= 0.5:
            if not g["diff"][jmax]:
                if not g["det"][jmax]:
                    tp[d] = 1
                    g["det"][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    if npos == 0:
        return float("nan")
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    prec = tp / np.maximum(fp + tp, 1e-300)
    if use07:
        ap = 0.0
        for t in [i / 10 for i in range(11)]:
            p = max([prec[i] for i in range(len(rec)) if rec[i] >= t], default=0.0)
            ap += p / 11
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def ann(i, img, cat, x1, y1, x2, y2, difficult=0):
    # 0-based continuous xyxy -> COCO xywh
    return {"id": i, "image_id": img, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": difficult}


def det(img, cat, x1, y1, x2, y2, score):
    return {"image_id": img, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


GT = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "emu"},
                   {"id": 4, "name": "fox"}],
    "annotations": [
        ann(1, 1, 1, 10, 10, 50, 50), ann(2, 1, 1, 60, 60, 100, 100), ann(3, 2, 1, 0, 0, 30, 30),
        ann(4, 2, 1, 40, 40, 80, 80, difficult=1), ann(5, 3, 1, 5, 5, 25, 45),
        ann(6, 1, 2, 0, 0, 20, 20), ann(7, 3, 2, 30, 30, 90, 70),
        ann(8, 2, 3, 10, 10, 40, 40),  # emu: ground truth but no detections
    ],  # fox: detections but no ground truth
}
DETS = [
    det(1, 1, 11, 11, 50, 52, 0.9), det(1, 1, 10, 10, 50, 50, 0.9),   # tie, duplicate of the same gt
    det(1, 1, 61, 58, 99, 101, 0.7), det(2, 1, 41, 41, 80, 79, 0.8),  # the second hits a difficult gt
    det(2, 1, 0, 0, 29, 31, 0.6), det(3, 1, 50, 50, 70, 70, 0.65),    # hit; false positive
    det(3, 1, 5, 5, 25, 30, 0.3),                                     # IoU 0.625: late true positive
    det(1, 2, 0, 0, 20, 20, 0.5), det(1, 2, 1, 1, 21, 21, 0.5),       # tie: hit and duplicate
    det(3, 2, 100, 100, 120, 120, 0.95), det(3, 2, 31, 29, 88, 72, 0.4),
    det(2, 4, 0, 0, 10, 10, 0.9),
]


@pytest.mark.parametrize("metric", ["voc07", "voc"])
def test_matches_devkit_transcription(metric):
    m = evaluate_voc(GT, DETS, metric=metric)
    for cat in GT["categories"]:
        expected = devkit_ap(GT, DETS, cat["id"], metric == "voc07")
        got = m["per_class"][cat["name"]]
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, abs=1e-9), cat["name"]
    assert m["per_class"]["emu"] == 0.0 and math.isnan(m["per_class"]["fox"])
    valid = [v for v in m["per_class"].values() if not math.isnan(v)]
    assert m["mAP"] == pytest.approx(np.mean(valid))


def test_hand_computed_values():
    # dog: ranks 0.95 FP, 0.5 TP, 0.5 FP (duplicate), 0.4 TP; 2 gts.
    # precision 0, 1/2, 1/3, 2/4; recall 0, .5, .5, 1.
    m = evaluate_voc(GT, DETS, metric="voc")
    assert m["per_class"]["dog"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    m07 = evaluate_voc(GT, DETS, metric="voc07")
    assert m07["per_class"]["dog"] == pytest.approx(11 * 0.5 / 11)


def test_perfect_detections_score_one_and_bad_inputs():
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": [ann(1, 1, 1, 0, 0, 10, 10)]}
    for metric in ("voc07", "voc"):
        assert evaluate_voc(gt, [det(1, 1, 0, 0, 10, 10, 1.0)], metric)["mAP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image_id 9"):
        evaluate_voc(gt, [det(9, 1, 0, 0, 10, 10, 1.0)])
    with pytest.raises(ValueError, match="voc12"):
        evaluate_voc(gt, [], metric="voc12")


def test_class_names_follow_the_ground_truths_category_order():
    from detkit.evaluation.voc_eval import evaluate_voc

    gt = {"images": [{"id": 1, "width": 50, "height": 50}],
          "categories": [{"id": 7, "name": "zebra"}, {"id": 2, "name": "ant"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 0, "area": 100}]}
    results = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9}]
    metrics = evaluate_voc(gt, results, "voc", class_names=["zebra", "ant"])
    assert metrics["per_class"]["zebra"] == 1.0 and np.isnan(metrics["per_class"]["ant"])
