"""RPN and RoI target assignment and sampling (Faster R-CNN Sec. 3.1.2, Fast R-CNN Sec. 2.3)."""
import pytest
import torch

from detkit.models.roi_heads import RoIHeadsSettings
from detkit.models.rpn import AnchorSettings, RPNSettings
from detkit.models.roi_heads import RoIHeads
from detkit.models.rpn import RegionProposalNetwork
from detkit.ops import box_iou


def make_rpn(**kw):
    cfg = RPNSettings(**kw, anchors=AnchorSettings(sizes=[32.0, 64.0], aspect_ratios=[1.0]))
    return RegionProposalNetwork(cfg, 8, 16)


def test_rpn_labels_follow_paper_rules():
    rpn = make_rpn()
    anchors = rpn.anchor_generators[0].grid_anchors((6, 6))
    gt = torch.tensor([[20.0, 20.0, 52.0, 52.0], [56.0, 56.0, 72.0, 72.0]])  # second: small, IoU < 0.7 with all
    labels, matched = rpn.assign_targets(anchors, [{"boxes": gt}], [(96, 96)])
    labels, matched = labels[0], matched[0]
    iou = box_iou(gt, anchors)
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < 96) & (anchors[:, 3] < 96)
    best = iou.max(0).values
    # >= 0.7 positive, < 0.3 negative (inside the image); cross-boundary anchors ignored.
    assert (labels[(best >= 0.7) & inside] == 1).all()
    assert (labels[(best < 0.3) & inside & (labels != 1)] == 0).all()
    assert (labels[~inside] == -1).all()
    # The best anchor of the small gt is positive although its IoU is below 0.7.
    j = int(iou[1].argmax())
    assert iou[1, j] < 0.7 and labels[j] == 1 and torch.equal(matched[j], gt[1])


def test_rpn_straddle_disabled_keeps_border_anchors():
    rpn = make_rpn(straddle_thresh=-1.0)
    anchors = rpn.anchor_generators[0].grid_anchors((4, 4))
    labels, _ = rpn.assign_targets(anchors, [{"boxes": torch.zeros(0, 4)}], [(64, 64)])
    assert (labels == 0).all()  # no gt: everything is negative, nothing ignored


@pytest.mark.parametrize("corner", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_rpn_small_corner_box_gets_an_inside_positive_anchor(corner):
    # A 14x14 box in a corner of a 96x96 image: its best anchor overall, [-8, -8, 24, 24] (IoU 0.19) at the
    # top left, crosses the border. Matched against all anchors, that one took the box's low-quality match
    # and was then ignored, leaving the box no positive at all; the best inside anchor must be positive.
    rpn = make_rpn()
    anchors = rpn.anchor_generators[0].grid_anchors((6, 6))
    x0, y0 = corner[0] * (96 - 14), corner[1] * (96 - 14)
    gt = torch.tensor([[x0, y0, x0 + 14.0, y0 + 14.0]])
    iou = box_iou(gt, anchors)[0]
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < 96) & (anchors[:, 3] < 96)
    assert not inside[iou.argmax()] and 0 < iou[inside].max() < 0.3  # the case described above
    labels, matched = rpn.assign_targets(anchors, [{"boxes": gt}], [(96, 96)])
    labels, matched = labels[0], matched[0]
    positive = labels == 1
    assert positive.any() and inside[positive].all()
    best_inside = int(torch.where(inside, iou, -1.0).argmax())
    assert labels[best_inside] == 1 and torch.equal(matched[best_inside], gt[0])
    assert (labels[~inside] == -1).all() and (labels[inside & ~positive] == 0).all()
    # straddle_thresh < 0 keeps every anchor (torchvision): the best one overall is the positive.
    labels, _ = make_rpn(straddle_thresh=-1.0).assign_targets(anchors, [{"boxes": gt}], [(96, 96)])
    assert torch.equal(torch.nonzero(labels[0] == 1).flatten(), torch.nonzero(iou == iou.max()).flatten())


def test_rpn_sampling_and_loss_counts():
    rpn = make_rpn(batch_size_per_image=16, positive_fraction=0.5)
    anchors = rpn.anchor_generators[0].grid_anchors((6, 6))
    labels = torch.zeros(1, anchors.shape[0])
    labels[0, :3] = 1
    pos, neg = rpn.sampler(labels[0])
    assert pos.sum() == 3 and neg.sum() == 13


def make_roi_heads(**kw):
    cfg = RoIHeadsSettings(**kw)
    return RoIHeads(cfg, None, None, None, num_classes=3)


def test_roi_sampling_thresholds_and_gt_added():
    heads = make_roi_heads(batch_size_per_image=64, positive_fraction=0.25)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor([
        [0.0, 0.0, 100.0, 90.0],    # IoU 0.9  -> foreground
        [0.0, 0.0, 100.0, 45.0],    # IoU 0.45 -> background
        [0.0, 0.0, 100.0, 12.0],    # IoU 0.12 -> background
        [0.0, 0.0, 100.0, 5.0],     # IoU 0.05 -> ignored (below bg_lo 0.1)
        [200.0, 200.0, 220.0, 220.0],  # IoU 0   -> ignored
    ])
    sampled, labels, deltas = heads.select_training_samples([props], [{"boxes": gt, "labels": torch.tensor([2])}])
    s = sampled[0]
    rows = {tuple(r.tolist()): int(lab) for r, lab in zip(s, labels)}
    assert rows[(0.0, 0.0, 100.0, 90.0)] == 2
    assert rows[(0.0, 0.0, 100.0, 100.0)] == 2  # gt added as a proposal
    assert rows[(0.0, 0.0, 100.0, 45.0)] == 0 and rows[(0.0, 0.0, 100.0, 12.0)] == 0
    assert (0.0, 0.0, 100.0, 5.0) not in rows and (200.0, 200.0, 220.0, 220.0) not in rows
    # The gt proposal regresses to itself: zero deltas.
    gt_row = [i for i, r in enumerate(s.tolist()) if r == [0.0, 0.0, 100.0, 100.0]][0]
    assert torch.allclose(deltas[gt_row], torch.zeros(4), atol=1e-6)


def test_roi_sampling_caps_foreground_fraction():
    heads = make_roi_heads(batch_size_per_image=16, positive_fraction=0.25)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    fg = gt + torch.linspace(0, 5, 40)[:, None] * torch.tensor([1.0, 1.0, 0.0, 0.0])
    bg = torch.tensor([[60.0, 0.0, 160.0, 100.0]]).repeat(40, 1)  # IoU 0.25
    _, labels, _ = heads.select_training_samples([torch.cat([fg, bg])],
                                                 [{"boxes": gt, "labels": torch.tensor([1])}])
    assert labels.numel() == 16 and (labels > 0).sum() == 4


def test_roi_images_without_objects_are_all_background():
    heads = make_roi_heads(batch_size_per_image=8)
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(20, 1)
    _, labels, _ = heads.select_training_samples([props], [{"boxes": torch.zeros(0, 4),
                                                            "labels": torch.zeros(0, dtype=torch.int64)}])
    assert labels.numel() == 8 and (labels == 0).all()
