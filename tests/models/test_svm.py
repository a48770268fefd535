"""R-CNN's SVMs, hard negative mining, ridge box regressor and the region feature cache."""
import json
import logging

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from detkit.models.svm import SVMSettings
from detkit.models.feature_cache import FeatureCache, FeatureCacheError
from detkit.models.svm import mining as svm_mining
from detkit.models.svm import (NEVER_FIRES_BIAS, SVMBoxHead, box_regression_targets, fit_svm_head, ridge_regression,
                               train_box_regressor, train_linear_svms)
from detkit.ops import BoxCoder, box_iou


def write_cache(path, images, num_classes, dtype="float32", fingerprint="fp"):
    """images: list of dicts of per-row arrays (features under 'features'), one dict per image."""
    dims = {k: v.shape[1] for k, v in images[0]["features"].items()}
    with FeatureCache.create(path, dims, dtype, num_classes, fingerprint) as w:
        for i, rows in enumerate(images):
            n = len(rows["gt_label"])
            w.append(i, rows["features"], rows.get("boxes", np.tile([0, 0, 10, 10], (n, 1))), rows["gt_label"],
                     rows.get("overlaps", np.zeros((n, num_classes))), rows.get("matched_gt", np.zeros((n, 4))),
                     rows.get("matched_label", np.zeros(n)), rows.get("matched_iou", np.zeros(n)))
    return FeatureCache.open(path, fingerprint)


# ------------------------------------------------------------------------------------- feature cache


def test_feature_cache_roundtrip_chunks_and_float16(tmp_path):
    rng = np.random.default_rng(0)
    fc7, pool5 = rng.normal(size=(9, 5)).astype(np.float32), rng.normal(size=(9, 3)).astype(np.float32)
    labels = np.arange(9) % 3
    for dtype in ("float32", "float16"):
        path = tmp_path / dtype
        w = FeatureCache.create(path, {"fc7": 5, "pool5": 3}, dtype, num_classes=2, fingerprint="abc")
        # image 0: rows 0..3 in two appends; image 1: no rows; image 2: rows 4..8
        for image, sl in [(0, slice(0, 2)), (0, slice(2, 4)), (1, slice(4, 4)), (2, slice(4, 9))]:
            n = sl.stop - sl.start
            w.append(image, {"fc7": fc7[sl], "pool5": pool5[sl]}, np.ones((n, 4)), labels[sl], np.full((n, 2), 0.5),
                     np.zeros((n, 4)), labels[sl], np.full(n, 0.25))
        assert not path.exists() and (tmp_path / f"{dtype}.partial").is_dir()
        w.close()
        assert path.is_dir() and not (tmp_path / f"{dtype}.partial").exists()
        cache = FeatureCache.open(path, fingerprint="abc")
        assert cache.num_rows == 9 and cache.features("fc7").dtype == np.dtype(dtype)
        assert isinstance(cache.features("fc7"), np.memmap)
        tol = 0 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(cache.features("fc7"), fc7, atol=tol)
        np.testing.assert_allclose(cache.features("pool5"), pool5, atol=tol)
        np.testing.assert_array_equal(cache.gt_label, labels)
        assert cache.overlaps.shape == (9, 2) and cache.matched_iou[0] == np.float32(0.25)
        assert cache.rows_of_image(0) == slice(0, 4) and cache.rows_of_image(1) == slice(4, 4)
        assert cache.rows_of_image(2) == slice(4, 9)
        assert cache.mean_norm("fc7") == pytest.approx(np.linalg.norm(fc7, axis=1).mean(), rel=1e-2)
        with pytest.raises(FeatureCacheError, match="image 7"):
            cache.rows_of_image(7)


def test_feature_cache_interrupted_writer_leaves_nothing_complete(tmp_path):
    path = tmp_path / "features"
    w = FeatureCache.create(path, {"fc7": 2}, num_classes=1, fingerprint="x")
    w.append(0, {"fc7": np.ones((3, 2))}, np.ones((3, 4)), np.zeros(3), np.zeros((3, 1)), np.zeros((3, 4)),
             np.zeros(3), np.zeros(3))
    del w  # the run dies before close()
    assert not path.exists()
    assert not FeatureCache.exists(path, "x")
    with pytest.raises(FeatureCacheError, match="not a complete feature cache"):
        FeatureCache.open(path)
    # the next run deletes the leftover and starts over
    w = FeatureCache.create(path, {"fc7": 2}, num_classes=1, fingerprint="x")
    w.close()
    assert FeatureCache.exists(path, "x") and FeatureCache.open(path).num_rows == 0
    # an exception inside `with` deletes the partial directory
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCache.create(tmp_path / "other", {"fc7": 2}, num_classes=1) as w:
            raise RuntimeError("boom")
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()


def test_feature_cache_checks(tmp_path):
    path = tmp_path / "features"
    FeatureCache.create(path, {"fc7": 2}, num_classes=1, fingerprint="model-A").close()
    with pytest.raises(FeatureCacheError, match="fingerprint") as e:
        FeatureCache.open(path, fingerprint="model-B")
    assert str(path) in str(e.value)
    assert FeatureCache.exists(path, "model-A") and not FeatureCache.exists(path, "model-B")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(FeatureCacheError, match="version"):
        FeatureCache.open(path)
    with pytest.raises(FeatureCacheError, match="already exists"):
        FeatureCache.create(path, {"fc7": 2}, num_classes=1)
    w = FeatureCache.create(tmp_path / "c2", {"fc7": 2}, num_classes=1)
    row = (np.ones((1, 4)), np.zeros(1), np.zeros((1, 1)), np.zeros((1, 4)), np.zeros(1), np.zeros(1))
    with pytest.raises(FeatureCacheError, match=r"image 0: features\['fc7'\] has shape"):
        w.append(0, {"fc7": np.ones((1, 3))}, *row)
    w.append(0, {"fc7": np.ones((1, 2))}, *row)
    w.append(1, {"fc7": np.ones((1, 2))}, *row)
    with pytest.raises(FeatureCacheError, match="image 0 was appended before"):
        w.append(0, {"fc7": np.ones((1, 2))}, *row)
    w.abort()


# ---------------------------------------------------------------------------------------------- SVMs


def toy_svm_images(rng, num_images=20, per_image=60, dim=8):
    """2 classes in 8-d: class k's positives cluster at 2 e_k; negatives near 0; one "boundary" negative of
    class 1 at 1.1 e_0 per image from image 10 on; "ignored" regions sit on the positives with IoU 0.5."""
    images, boundary = [], []
    for i in range(num_images):
        gt = np.stack([2 * np.eye(dim)[0], 2 * np.eye(dim)[1]]) + rng.normal(scale=0.1, size=(2, dim))
        neg = rng.normal(scale=0.2, size=(per_image, dim))
        overlaps = np.zeros((per_image, 2))
        if i >= 10:
            neg[0] = 1.1 * np.eye(dim)[0] + rng.normal(scale=0.02, size=dim)
            boundary.append(neg[0].copy())
            overlaps[0, 0] = 0.2
        neg[1] = 2 * np.eye(dim)[0]
        overlaps[1, 0] = 0.5  # between neg_iou and a positive: ignored
        feats = np.concatenate([gt, neg]).astype(np.float32)
        overlaps = np.concatenate([np.eye(2), overlaps])
        images.append({"features": {"fc7": feats}, "gt_label": np.r_[1, 2, np.zeros(per_image, int)],
                       "overlaps": overlaps})
    return images, np.asarray(boundary).reshape(-1, dim)


def test_hard_negative_mining_separates_and_keeps_the_boundary_negatives(tmp_path, monkeypatch):
    images, boundary = toy_svm_images(np.random.default_rng(0))
    cache = write_cache(tmp_path / "c", images, num_classes=2)
    last_fit = {}
    fit = svm_mining._fit_one_svm

    def recording_fit(x_pos, x_neg, *args):
        last_fit[args[4]] = x_neg.copy()  # (C, positive_weight, bias_multiplier, max_iter, name, tol)
        return fit(x_pos, x_neg, *args)

    monkeypatch.setattr(svm_mining, "_fit_one_svm", recording_fit)
    weight, bias, stats = train_linear_svms(cache, ["cat", "dog"], C=10.0, retrain_limit=100, chunk_rows=62)
    x = np.asarray(cache.features("fc7"))
    scores = x @ weight.T + bias
    for k in range(2):
        positive = cache.gt_label == k + 1
        negative = (cache.gt_label != k + 1) & (cache.overlaps[:, k] < 0.3)
        assert (scores[positive, k] > 0).all() and (scores[negative, k] < 0).all()
        assert stats[k]["positives"] == 20 and stats[k]["retrains"] >= 2
        # the cache ends far smaller than the negatives, yet they are all classified right
        assert stats[k]["negatives"] < 0.2 * negative.sum()
    # every boundary negative was mined into class 1's final training set
    final = last_fit["cat"]
    assert all(np.abs(final - b).max(axis=1).min() < 1e-6 for b in boundary.astype(np.float32))
    # the ignored regions (on the positives) are never negatives
    assert not (np.abs(final - 2 * np.eye(8)[0]).max(axis=1) < 1e-6).any()


def test_svm_equals_a_direct_liblinear_fit_on_a_tiny_problem(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 4)).astype(np.float32)
    gt_label = np.r_[np.ones(5, int), np.zeros(25, int)]
    feats[:5] += 1.5
    overlaps = np.zeros((30, 1))
    overlaps[5:8, 0] = 0.4  # ignored
    cache = write_cache(tmp_path / "c", [{"features": {"fc7": feats}, "gt_label": gt_label, "overlaps": overlaps}], 1)
    kw = dict(C=0.05, positive_weight=3.0, bias_multiplier=4.0)
    weight, bias, stats = train_linear_svms(cache, ["thing"], feature_scale=2.0, retrain_limit=1000, rounds=2,
                                            tol=1e-4, **kw)
    used = np.r_[0:5, 8:30]
    direct = LinearSVC(loss="hinge", C=kw["C"], class_weight={1: kw["positive_weight"], 0: 1},
                       intercept_scaling=kw["bias_multiplier"], dual=True, max_iter=10000, random_state=0)
    direct.fit(2.0 * feats[used].astype(np.float64), (gt_label[used] == 1).astype(int))
    np.testing.assert_allclose(weight[0], direct.coef_[0], rtol=1e-5, atol=1e-6)
    assert bias[0] == pytest.approx(direct.intercept_[0], rel=1e-5, abs=1e-6)
    z = 2.0 * feats[used] @ weight[0] + bias[0]
    hinge = np.maximum(0, 1 - np.where(gt_label[used] == 1, 1, -1) * z)
    expected = (0.5 * (weight[0] @ weight[0] + (bias[0] / 4.0) ** 2)
                + kw["C"] * (3.0 * hinge[:5].sum() + hinge[5:].sum()))
    assert stats[0]["objective"] == pytest.approx(expected, rel=1e-4)
    assert stats[0]["hard_negatives"] == 22  # the second pass finds them all cached already


def test_class_without_positives_never_fires(tmp_path, caplog):
    images, _ = toy_svm_images(np.random.default_rng(2), num_images=3)
    for im in images:
        im["overlaps"] = np.concatenate([im["overlaps"], np.zeros((len(im["overlaps"]), 1))], axis=1)
    cache = write_cache(tmp_path / "c", images, num_classes=3)
    with caplog.at_level(logging.WARNING):
        weight, bias, stats = train_linear_svms(cache, ["cat", "dog", "unicorn"], C=10.0)
    assert "'unicorn': no positive examples" in caplog.text
    assert (weight[2] == 0).all() and bias[2] == NEVER_FIRES_BIAS and stats[2]["negatives"] == 0
    head = SVMBoxHead(8, 3).eval()
    head.set_svms(weight, bias, 1.0)
    scores, _ = head(torch.randn(50, 8) * 100)
    assert (scores[:, 3] < -1000).all()


# ------------------------------------------------------------------------------------------- the head


def test_svm_box_head_forward():
    torch.manual_seed(0)
    head = SVMBoxHead(in_features=6, num_classes=3, pooled_features=5)
    x, pooled = torch.randn(7, 6), torch.randn(7, 5)
    head.train()
    scores, deltas = head(x, pooled=pooled)  # unfitted, training mode: no error, zero deltas
    assert scores.shape == (7, 4) and deltas.shape == (7, 16) and (deltas == 0).all()
    head.eval()
    with pytest.raises(RuntimeError, match="SVMs of this R-CNN are not trained"):
        head(x)
    w, b = torch.randn(3, 6), torch.randn(3)
    head.set_svms(w, b, 0.5)
    scores, deltas = head(x, pooled=pooled)
    assert (scores[:, 0] == 0).all()
    torch.testing.assert_close(scores[:, 1:], 0.5 * x @ w.T + b)
    assert (deltas == 0).all()  # the regressor is not fitted
    head.set_regressor(torch.randn(3, 6, 4), torch.randn(3, 4), torch.rand(3, 4) + 0.5, 2.0)
    _, deltas = head(x, pooled=pooled)
    assert (deltas[:, :4] == 0).all() and (deltas[:, 4:] != 0).all()
    _, deltas = head(x)  # no pooled features: boxes stay the proposals
    assert (deltas == 0).all()
    state = head.state_dict()
    assert {"svm_weight", "svm_bias", "feature_scale", "reg_weight", "reg_mean", "reg_std", "fitted"} <= set(state)
    again = SVMBoxHead(6, 3, 5).eval()
    again.load_state_dict(state)
    torch.testing.assert_close(again(x, pooled)[1], head(x, pooled)[1])


# -------------------------------------------------------------------------------------- box regressor


def test_box_regression_targets_are_rcnn_appendix_c():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[2.0, 4.0, 12.0, 24.0], [0.0, 0.0, 20.0, 10.0]])
    t = box_regression_targets(proposals, gt)
    # (dx / w, dy / h, log(w' / w), log(h' / h)) with centres (5, 10) -> (7, 14) and (10, 5)
    expected = torch.tensor([[0.2, 0.2, 0.0, 0.0], [0.5, -0.25, np.log(2.0), np.log(0.5)]], dtype=torch.float32)
    torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("dim,samples", [(6, 60), (50, 20)], ids=["primal", "dual"])
def test_box_regressor_recovers_exact_linear_targets(tmp_path, dim, samples):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(samples, dim))
    truth, offset = rng.normal(scale=0.05, size=(dim, 4)), np.array([0.05, -0.02, 0.1, -0.1])
    targets = x @ truth + offset
    xy = rng.uniform(0, 100, size=(samples, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(20, 60, size=(samples, 2))], axis=1)
    gt = BoxCoder((1, 1, 1, 1)).decode(torch.from_numpy(targets), torch.from_numpy(proposals)).numpy()
    # plus rows that must be left out: IoU 0.5 and another class's samples, with unrelated ground truth
    junk = 8
    rows = {"features": {"pool5": np.concatenate([x, rng.normal(size=(junk, dim))]).astype(np.float32)},
            "gt_label": np.zeros(samples + junk, int),
            "boxes": np.concatenate([proposals, proposals[:junk]]),
            "matched_gt": np.concatenate([gt, proposals[:junk] + 30]),
            "matched_label": np.r_[np.ones(samples, int), np.ones(junk // 2, int), 2 * np.ones(junk // 2, int)],
            "matched_iou": np.r_[np.full(samples, 0.8), np.full(junk // 2, 0.5), np.full(junk // 2, 0.9)]}
    cache = write_cache(tmp_path / "c", [rows], num_classes=3)
    weight, mean, std, stats = train_box_regressor(cache, 3, lam=1e-8, pooled_scale=0.5, chunk_rows=7)
    assert [s["samples"] for s in stats] == [samples, junk // 2, 0]
    assert (weight[2] == 0).all() and stats[0]["train_error"] < 1e-8
    head = SVMBoxHead(in_features=2, num_classes=3, pooled_features=dim).eval()
    head.set_svms(torch.zeros(3, 2), torch.zeros(3), 1.0)
    head.set_regressor(weight, mean, std, 0.5)
    _, deltas = head(torch.zeros(samples, 2), pooled=torch.from_numpy(x).float())
    boxes = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, torch.from_numpy(proposals).float()).view(samples, 4, 4)
    torch.testing.assert_close(boxes[:, 1], torch.from_numpy(gt).float(), atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(boxes[:, 0], torch.from_numpy(proposals).float())  # background: the proposal
    torch.testing.assert_close(boxes[:, 3], torch.from_numpy(proposals).float())  # no samples: the proposal


@pytest.mark.parametrize("n,p", [(40, 5), (10, 30)], ids=["primal", "dual"])
def test_ridge_regression_matches_closed_form_with_unregularised_bias(n, p):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(n + 3, p)), rng.normal(size=(n, 4))
    rows = np.arange(3, n + 3)
    w = ridge_regression(x, rows, torch.from_numpy(y), lam=7.0, scale=2.0, chunk_rows=6).numpy()
    xs = 2.0 * x[rows]
    xc, yc = xs - xs.mean(0), y - y.mean(0)
    expected = np.linalg.solve(xc.T @ xc + 7.0 * np.eye(p), xc.T @ yc)
    np.testing.assert_allclose(w[:-1], expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w[-1], y.mean(0) - xs.mean(0) @ expected, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------- whole stage


class FakeDataset:
    """Transform-free dataset of 6 32x32 images with 2 classes; pixel (0, 0, 0) holds the image index."""

    class_names = ["cat", "dog"]

    def __init__(self):
        rng = np.random.default_rng(5)
        self.anns = []
        for i in range(6):
            boxes = [[4, 4, 14, 16], [16, 10, 30, 26], [0, 20, 8, 30], [20, 0, 30, 8]]
            self.anns.append({"boxes": np.asarray(boxes, np.float32) + rng.uniform(-1, 1, (4, 4)).astype(np.float32),
                              "labels": np.array([1, 2, 1, 2]), "difficult": np.array([False, False, True, False]),
                              "iscrowd": np.array([False, False, False, True])})

    def __len__(self):
        return len(self.anns)

    def annotations(self, i):
        return self.anns[i]

    def __getitem__(self, i):
        image = np.zeros((32, 32, 3), np.uint8)
        image[0, 0, 0] = i
        return image, {"boxes": torch.from_numpy(self.anns[i]["boxes"])}


class FakeModel(torch.nn.Module):
    """Region features as a function of the boxes: fc7 holds the IoU with the usable ground truth of each
    class, pool5 the box targets to the best-matching ground truth, so SVMs and regressor can learn."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset, self.calls = dataset, []

    def extract_region_features(self, images, proposals):
        assert not self.training and not torch.is_grad_enabled()
        (image,), (boxes,) = images, proposals
        self.calls.append(len(boxes))
        ann = self.dataset.annotations(int(image[0, 0, 0]))
        gt, labels = torch.from_numpy(ann["boxes"][:2]), torch.from_numpy(ann["labels"][:2])
        iou = box_iou(boxes, gt)
        best = iou.argmax(1)
        targets = box_regression_targets(boxes, gt[best]) * (iou.max(1).values > 0.3)[:, None]
        vectors = torch.cat([iou[:, labels == 1].amax(1, keepdim=True), iou[:, labels == 2].amax(1, keepdim=True),
                             boxes / 32, torch.ones(len(boxes), 1)], dim=1)
        pooled = torch.cat([targets, boxes / 32], dim=1)
        return pooled, vectors


def jittered_proposals(dataset):
    def proposals_fn(i):
        rng = np.random.default_rng(100 + i)
        gt = dataset.anns[i]["boxes"][:2]
        near = np.repeat(gt, 6, axis=0) + rng.uniform(-1.5, 1.5, size=(12, 4))
        xy = rng.uniform(0, 20, size=(30, 2))
        far = np.concatenate([xy, xy + rng.uniform(3, 12, size=(30, 2))], axis=1)
        return np.concatenate([near, far]).astype(np.float32)
    return proposals_fn


def test_fit_svm_head_end_to_end(tmp_path, caplog):
    dataset = FakeDataset()
    model = FakeModel(dataset).train()
    proposals_fn = jittered_proposals(dataset)
    head = SVMBoxHead(in_features=7, num_classes=2, pooled_features=8)
    (tmp_path / "features.partial").mkdir()  # left by an interrupted run
    cfg = SVMSettings(ridge_lambda=1.0)
    stats = fit_svm_head(model, dataset, proposals_fn, head, tmp_path, "cpu", cfg, fingerprint="m1",
                         regions_per_call=16, progress=False)
    assert model.training  # mode restored
    assert max(model.calls) <= 16 and sum(model.calls) == 6 * (2 + 42)  # difficult and crowd boxes left out
    assert not (tmp_path / "features.partial").exists() and stats["reused_cache"] is False
    cache = FeatureCache.open(tmp_path / "features", "m1")
    assert cache.num_rows == 6 * 44 and (cache.gt_label > 0).sum() == 12
    assert [s["positives"] for s in stats["svm"]] == [6, 6]
    assert stats["feature_scale"] == pytest.approx(20 / cache.mean_norm("fc7"))
    assert bool(head.fitted) and bool(head.regressor_fitted)

    head.eval()
    pooled = torch.from_numpy(np.array(cache.features("pool5")))
    vectors = torch.from_numpy(np.array(cache.features("fc7")))
    scores, deltas = head(vectors, pooled=pooled)
    ov = torch.from_numpy(np.array(cache.overlaps))
    for k in (1, 2):
        assert scores[ov[:, k - 1] > 0.7, k].min() > scores[ov[:, k - 1] < 0.3, k].max()
    # the regressor moves the near proposals of each class onto their ground truth
    boxes = torch.from_numpy(np.array(cache.boxes))
    decoded = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, boxes).view(-1, 3, 4)
    label = torch.from_numpy(np.array(cache.matched_label))
    near = (torch.from_numpy(np.array(cache.matched_iou)) > 0.6) & (label > 0)
    gt = torch.from_numpy(np.array(cache.matched_gt))[near]
    before = box_iou(boxes[near], gt).diagonal()
    after = box_iou(decoded[near, label[near]], gt).diagonal()
    assert after.mean() > 0.97 > before.mean()

    # same fingerprint: the cache is reused, the model not called
    model.calls.clear()
    with caplog.at_level(logging.INFO, logger="detkit.models.svm"):
        again = fit_svm_head(model, dataset, proposals_fn, SVMBoxHead(7, 2, 8), tmp_path, "cpu", cfg,
                             fingerprint="m1", progress=False)
    assert again["reused_cache"] and not model.calls and "reusing" in caplog.text
    # another fingerprint: rebuilt
    third = fit_svm_head(model, dataset, proposals_fn, SVMBoxHead(7, 2, None), tmp_path, "cpu", cfg,
                         fingerprint="m2", progress=False)
    assert not third["reused_cache"] and model.calls and "regressor" not in third
    assert FeatureCache.open(tmp_path / "features", "m2").dims == {"fc7": 7}


def test_head_handles_an_image_without_regions():
    head = SVMBoxHead(6, 3, pooled_features=10)
    head.set_svms(torch.ones(3, 6), torch.zeros(3), 1.0)
    head.eval()
    scores, deltas = head(torch.zeros(0, 6), torch.zeros(0, 10))
    assert scores.shape == (0, 4) and deltas.shape == (0, 16)
