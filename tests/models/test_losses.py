"""The RPN and RoI head losses (Faster R-CNN Sec. 3.1.2, Fast R-CNN Eq. 1), proposal filtering and detection
post-processing, on tiny hand-made cases whose expected numbers are computed here with plain formulas."""
import math

import pytest
import torch

from detkit.models.roi_heads import RoIHeadsSettings
from detkit.models.rpn import AnchorSettings, RPNSettings
from detkit.models.roi_heads import BoxPredictor, RoIHeads
from detkit.models.rpn import RegionProposalNetwork
from detkit.models.transform import ImageList


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce(logit, label):
    p = sigmoid(logit)
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def smooth_l1(d, beta):
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def encode(box, ref, weights=(1.0, 1.0, 1.0, 1.0)):
    """(dx, dy, dw, dh) of ``box`` from ``ref`` (R-CNN Appendix C), both [x1, y1, x2, y2]."""
    rw, rh = ref[2] - ref[0], ref[3] - ref[1]
    bw, bh = box[2] - box[0], box[3] - box[1]
    wx, wy, ww, wh = weights
    return [wx * ((box[0] + bw / 2) - (ref[0] + rw / 2)) / rw, wy * ((box[1] + bh / 2) - (ref[1] + rh / 2)) / rh,
            ww * math.log(bw / rw), wh * math.log(bh / rh)]


def f64(values):
    # Float64 throughout: a float32 0.3 is off by 1e-8, which the exact comparisons would see.
    return torch.tensor(values, dtype=torch.float64)


def make_rpn(**kw):
    return RegionProposalNetwork(RPNSettings(**kw, anchors=AnchorSettings(sizes=[32.0], aspect_ratios=[1.0])), 8, 16)


def make_roi_heads(**kw):
    return RoIHeads(RoIHeadsSettings(**kw), None, None, BoxPredictor(), num_classes=2)


# ----------------------------------------------------------------------------- RPN loss

ANCHORS = [[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 50.0], [5.0, 5.0, 15.0, 25.0]]
JUNK = 9.0  # in every slot the loss must not read: an error there would change the result a lot


def test_rpn_loss_is_bce_over_sampled_anchors_and_smooth_l1_on_positives():
    beta, weight = 1.0 / 9.0, 2.0
    rpn = make_rpn(smooth_l1_beta=beta, box_loss_weight=weight)
    objectness = f64([[1.5, -0.5, 3.0], [0.2, -2.0, 0.7]]).requires_grad_()
    # Image 0: anchor 0 positive, 1 negative, 2 ignored. Image 1: anchor 0 negative, 1 positive, and 2 is
    # labelled positive but not sampled (it must count nowhere, normaliser included).
    labels = f64([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    pos = torch.tensor([[True, False, False], [False, True, False]])
    neg = torch.tensor([[False, True, False], [True, False, False]])
    gt0, gt1 = [1.0, 2.0, 12.0, 11.0], [12.0, 8.0, 34.0, 56.0]
    matched = torch.full((2, 3, 4), JUNK, dtype=torch.float64)
    matched[0, 0], matched[1, 1], matched[1, 2] = map(f64, (gt0, gt1, [0.0, 0.0, 20.0, 20.0]))
    # Components on both sides of beta = 0.111: -0.1 and -0.05, -0.095 quadratic; the rest linear.
    d0, d1 = [0.05, 0.3, -0.02, 0.5], [0.1, -0.2, 0.0, 0.04]
    deltas = torch.full((2, 3, 4), JUNK, dtype=torch.float64)
    deltas[0, 0], deltas[1, 1] = f64(d0), f64(d1)
    anchors = f64(ANCHORS)

    losses = rpn.compute_loss(objectness, deltas, anchors, labels, matched, pos, neg)

    sampled = [(1.5, 1), (-0.5, 0), (0.2, 0), (-2.0, 1)]
    expected_obj = sum(bce(x, y) for x, y in sampled) / 4
    t0, t1 = encode(gt0, ANCHORS[0]), encode(gt1, ANCHORS[1])
    assert t0 == pytest.approx([0.15, 0.15, math.log(1.1), math.log(0.9)])  # the targets, by eye
    expected_box = weight * sum(smooth_l1(d - t, beta) for d, t in zip(d0 + d1, t0 + t1)) / 4
    assert set(losses) == {"rpn/objectness", "rpn/box_reg"}
    assert losses["rpn/objectness"].item() == pytest.approx(expected_obj, rel=1e-12)
    assert losses["rpn/box_reg"].item() == pytest.approx(expected_box, rel=1e-12)
    # d(loss)/d(logit) = (sigmoid(x) - y) / 4 on the sampled anchors, 0 elsewhere.
    losses["rpn/objectness"].backward()
    expected_grad = f64([[sigmoid(1.5) - 1, sigmoid(-0.5), 0.0], [sigmoid(0.2), sigmoid(-2.0) - 1, 0.0]]) / 4
    torch.testing.assert_close(objectness.grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_rpn_loss_without_sampled_anchors_is_zero():
    rpn = make_rpn()
    none = torch.zeros(1, 3, dtype=torch.bool)
    losses = rpn.compute_loss(torch.zeros(1, 3), torch.zeros(1, 3, 4), torch.tensor(ANCHORS), torch.zeros(1, 3),
                              torch.zeros(1, 3, 4), none, none)
    assert losses["rpn/objectness"].item() == 0.0 and losses["rpn/box_reg"].item() == 0.0


# ----------------------------------------------------------------------------- RoI head loss


def test_roi_loss_is_cross_entropy_and_smooth_l1_on_the_true_class_only():
    beta, weight = 1.0, 1.5
    heads = make_roi_heads(smooth_l1_beta=beta, box_loss_weight=weight)
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 1.0, 3.0], [0.0, 0.0, 0.0]]
    labels = [0, 1, 2, 1]
    true_deltas = {1: [0.5, -0.3, 2.0, 0.0], 2: [-1.5, 0.2, 0.1, 0.9], 3: [0.0, 0.0, 0.0, 0.0]}
    targets = [[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, -2.0, 0.0, 0.0]]
    box_deltas = torch.full((4, 12), 7.0, dtype=torch.float64)  # other classes' deltas: far off, must not count
    for r, d in true_deltas.items():
        box_deltas[r, 4 * labels[r]:4 * labels[r] + 4] = f64(d)

    losses = heads.compute_loss(f64(logits), box_deltas, torch.tensor(labels), f64(targets))

    expected_cls = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels)) / 4
    # Background RoIs add no box loss but count in the normaliser (all sampled RoIs), as in Fast R-CNN.
    box_sum = sum(smooth_l1(d - t, beta) for r, ds in true_deltas.items() for d, t in zip(ds, targets[r]))
    assert box_sum == pytest.approx((0.125 + 0.045 + 1.0) + (1.0 + 0.02 + 0.005 + 0.405) + (0.045 + 1.5))
    assert set(losses) == {"roi/cls", "roi/box_reg"}
    assert losses["roi/cls"].item() == pytest.approx(expected_cls, rel=1e-12)
    assert losses["roi/box_reg"].item() == pytest.approx(weight * box_sum / 4, rel=1e-12)


# ----------------------------------------------------------------------------- proposal filtering

# Non-overlapping boxes in a 100x100 image (NMS removes none): widths/heights around 12 and 8.
A = [10.0, 10.0, 21.9, 40.0]   # 11.9 wide
B = [30.0, 10.0, 42.1, 40.0]   # 12.1 wide
C = [50.0, 10.0, 80.0, 21.9]   # 11.9 high
D = [10.0, 50.0, 22.0, 62.0]   # 12 x 12: at the threshold, kept (>=)
E = [50.0, 50.0, 57.9, 57.9]   # 7.9 x 7.9


def test_filter_proposals_drops_boxes_below_min_size_times_the_image_scale():
    # min_size is in original-image pixels: 8 px is 12 px in an image resized by 1.5 and 4 px at 0.5.
    rpn = make_rpn(min_size=8.0).eval()
    anchors = torch.tensor([A, B, C, D, E])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]).repeat(3, 1)
    images = ImageList(torch.zeros(3, 3, 100, 100), [(100, 100)] * 3, [1.5, 1.0, 0.5])
    # Zero deltas: the decoded proposals are the anchors.
    proposals = rpn.filter_proposals(torch.zeros(3, 5, 4), anchors, scores, images)
    expected = [[B, D], [A, B, C, D], [A, B, C, D, E]]
    assert len(proposals) == 3
    for got, want in zip(proposals, expected):
        torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- detection post-processing


def test_postprocess_decodes_clips_thresholds_suppresses_per_class_and_caps():
    heads = make_roi_heads(score_thresh=0.05, nms_thresh=0.3, detections_per_img=3)
    # Per proposal: its class probabilities (background, 1, 2) and deltas per class (weights 10, 10, 5, 5).
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 30.0],    # P0
                               [12.0, 10.0, 32.0, 30.0],    # P1
                               [40.0, 30.0, 70.0, 60.0],    # P2: crosses the border, clipped
                               [70.0, 0.0, 90.0, 20.0]]),   # P3: outside, clipped to zero width
                 torch.tensor([[0.0, 0.0, 10.0, 10.0],      # Q0
                               [20.0, 20.0, 30.0, 30.0]])]  # Q1
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.7, 0.1], [0.5, 0.02, 0.48], [0.06, 0.9, 0.04],
                          [0.1, 0.5, 0.4], [0.1, 0.35, 0.55]])
    deltas = torch.zeros(6, 12)
    deltas[0, 8] = 1.0                  # P0, class 2: dx = 1/10 of the width: 2 px right -> [12, 10, 32, 30]
    deltas[1, 6] = 5.0 * math.log(1.5)  # P1, class 1: 1.5 times wider about its centre 22 -> [7, 10, 37, 30]
    image_sizes = [(50, 60), (40, 40)]

    dets = heads.postprocess(torch.log(probs), deltas, proposals, image_sizes)

    # Image 0, candidates: P0/1 [10,10,30,30] .6, P0/2 [12,10,32,30] .3, P1/1 [7,10,37,30] .7,
    # P1/2 [12,10,32,30] .1, P2/1 .02 (below 0.05), P2/2 [40,30,60,50] .48, P3/1 .9 and P3/2 .04 (zero width).
    # Class 1: P1/1 suppresses P0/1 (IoU 400/600). Class 2: P0/2 suppresses P1/2 (same box). P0/2 overlaps
    # P1/1 as much, but another class's box never suppresses.
    torch.testing.assert_close(dets[0]["boxes"], torch.tensor([[7.0, 10.0, 37.0, 30.0], [40.0, 30.0, 60.0, 50.0],
                                                               [12.0, 10.0, 32.0, 30.0]]), rtol=0, atol=1e-4)
    torch.testing.assert_close(dets[0]["scores"], torch.tensor([0.7, 0.48, 0.3]), rtol=0, atol=1e-6)
    assert dets[0]["labels"].tolist() == [1, 2, 2]
    # Image 1: four candidates survive; detections_per_img keeps the best three (Q1/1 at .35 goes), both
    # classes of Q0 among them.
    torch.testing.assert_close(dets[1]["boxes"], torch.tensor([[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0],
                                                               [0.0, 0.0, 10.0, 10.0]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(dets[1]["scores"], torch.tensor([0.55, 0.5, 0.4]), rtol=0, atol=1e-6)
    assert dets[1]["labels"].tolist() == [2, 1, 2]
