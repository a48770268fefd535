"""Core ops against independent reference computations (NumPy / plain Python)."""
import math

import numpy as np
import pytest
import torch

from detkit.ops import AnchorGenerator, BalancedSampler, BoxCoder, Matcher, batched_nms, box_iou
from detkit.ops import RoIAlignExtractor, RoIPoolExtractor


def ref_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union
    return out


def random_boxes(n, size=100.0, seed=0):
    g = np.random.default_rng(seed)
    xy = g.uniform(0, size, (n, 2))
    wh = g.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_box_iou_matches_reference():
    a, b = random_boxes(7, seed=1), random_boxes(5, seed=2)
    got = box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(got, ref_iou(a, b), rtol=1e-9, atol=1e-12)


def test_box_coder_matches_rcnn_formulas_and_roundtrips():
    ref = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    box = torch.tensor([[15.0, 10.0, 75.0, 90.0]])
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    d = coder.encode(box, ref)[0]
    # R-CNN Appendix C: t_x = (G_x - P_x) / P_w, t_w = log(G_w / P_w); times the weights.
    px, py, pw, ph = 30.0, 60.0, 40.0, 80.0
    gx, gy, gw, gh = 45.0, 50.0, 60.0, 80.0
    expected = [10 * (gx - px) / pw, 10 * (gy - py) / ph, 5 * math.log(gw / pw), 5 * math.log(gh / ph)]
    np.testing.assert_allclose(d.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(coder.decode(d[None], ref).numpy(), box.numpy(), rtol=1e-5)


def test_box_coder_class_specific_decode_and_clamp():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 100.0, 100.0]])  # two classes
    out = coder.decode(deltas, ref)
    assert out.shape == (1, 8)
    np.testing.assert_allclose(out[0, :4].numpy(), [0, 0, 10, 10], atol=1e-5)
    # dw = 100 is clamped to log(1000/16): the box is at most 62.5x wider, never inf.
    width = (out[0, 6] - out[0, 4]).item()
    assert math.isfinite(width) and width == pytest.approx(10 * 1000 / 16, rel=1e-4)


def ref_nms(boxes, scores, classes, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(classes[i] != classes[j] or ref_iou(boxes[[i]], boxes[[j]])[0, 0] <= thr for j in keep):
            keep.append(i)
    return keep


def test_batched_nms_matches_greedy_reference():
    boxes = random_boxes(40, size=60.0, seed=3)
    g = np.random.default_rng(4)
    scores = g.uniform(size=40)
    classes = g.integers(0, 3, 40)
    got = batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes), 0.4).tolist()
    assert got == ref_nms(boxes, scores, classes, 0.4)


def ref_roi_pool(feat, roi, out, scale):
    """Fast R-CNN's (Caffe) RoI max pooling, written from its definition."""
    c, h, w = feat.shape
    x1, y1, x2, y2 = [int(math.floor(v * scale + 0.5)) for v in roi]  # C round(): half away from zero
    rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    bw, bh = rw / out, rh / out
    res = np.zeros((c, out, out))
    for i in range(out):
        for j in range(out):
            hs = min(max(int(math.floor(i * bh)) + y1, 0), h)
            he = min(max(int(math.ceil((i + 1) * bh)) + y1, 0), h)
            ws = min(max(int(math.floor(j * bw)) + x1, 0), w)
            we = min(max(int(math.ceil((j + 1) * bw)) + x1, 0), w)
            if he > hs and we > ws:
                res[:, i, j] = feat[:, hs:he, ws:we].reshape(c, -1).max(1)
    return res


def test_roi_pool_matches_reference():
    g = np.random.default_rng(5)
    feat = g.normal(size=(1, 3, 12, 16))
    rois = [np.array([[3.0, 5.0, 100.0, 90.0], [0.0, 0.0, 255.0, 191.0], [40.0, 40.0, 41.0, 41.0]])]
    ext = RoIPoolExtractor(output_size=4, strides=16)
    got = ext(torch.tensor(feat), [torch.tensor(r) for r in rois]).numpy()
    for k, roi in enumerate(rois[0]):
        np.testing.assert_allclose(got[k], ref_roi_pool(feat[0], roi, 4, 1 / 16), rtol=1e-12)


def test_roi_align_is_exact_on_linear_features():
    # Bilinear interpolation reproduces a linear function exactly, so each bin's average
    # is the function at the bin centre (aligned=True: pixel centres at half-integers).
    h, w = 20, 24
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    feat = torch.tensor((2.0 * xs - 3.0 * ys + 1.0)[None, None])
    ext = RoIAlignExtractor(output_size=2, strides=1, sampling_ratio=2, aligned=True)
    roi = torch.tensor([[4.0, 6.0, 12.0, 14.0]], dtype=torch.float64)
    got = ext(feat, [roi])[0, 0].numpy()
    centres_x = 4 + np.array([2.0, 6.0])
    centres_y = 6 + np.array([2.0, 6.0])
    expected = 2.0 * centres_x[None, :] - 3.0 * centres_y[:, None] + 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_anchor_generator_paper_defaults():
    gen = AnchorGenerator()  # 3 scales x 3 ratios at stride 16
    assert gen.num_anchors_per_location == 9
    anchors = gen.grid_anchors((2, 3))
    assert anchors.shape == (2 * 3 * 9, 4)
    cell = anchors[:9]
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    areas = sorted(set(round(a) for a in (w * h).tolist()))
    assert areas == [128**2, 256**2, 512**2]
    np.testing.assert_allclose(sorted(set(round(r, 4) for r in (h / w).tolist())), [0.5, 1.0, 2.0])
    # Centres at the centre of each stride cell, position-major order.
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.allclose(centres[:9], torch.tensor([8.0, 8.0]).expand(9, 2))
    assert torch.allclose(centres[9], torch.tensor([24.0, 8.0]))
    assert torch.allclose(centres[27], torch.tensor([8.0, 24.0]))


def test_matcher_rpn_rules():
    iou = torch.tensor([[0.9, 0.5, 0.2, 0.65, 0.0],
                        [0.1, 0.6, 0.1, 0.0, 0.0]])
    m = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # col0 >= 0.7 -> gt0; col1 is gt1's best (0.6) -> positive; col2 < 0.3 -> negative;
    # col3 between -> ignored; col4 -> negative.
    assert m.tolist() == [0, 1, -1, -2, -1]


def test_matcher_fast_rcnn_background_floor():
    iou = torch.tensor([[0.55, 0.3, 0.05]])
    m = Matcher(0.5, 0.5, low_threshold_floor=0.1)(iou)
    assert m.tolist() == [0, -1, -2]


def test_balanced_sampler_fractions():
    labels = torch.cat([torch.ones(300), torch.zeros(1000), -torch.ones(50)])
    pos, neg = BalancedSampler(256, 0.5)(labels, generator=torch.Generator().manual_seed(0))
    assert pos.sum() == 128 and neg.sum() == 128
    assert labels[pos].eq(1).all() and labels[neg].eq(0).all()
    few = torch.cat([torch.ones(10), torch.zeros(1000)])
    pos, neg = BalancedSampler(256, 0.5)(few)
    assert pos.sum() == 10 and neg.sum() == 246  # missing positives are filled with negatives


def test_box_coder_decodes_zero_boxes():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    assert coder.decode(torch.zeros(0, 12), torch.zeros(0, 4)).shape == (0, 12)
