"""Feature Pyramid Networks (Lin et al. 2017) and light box heads: level assignment against the paper's
formula, the multi-level RPN against a per-level reference, FPN refusal messages, and detectors with a neck
and a light box head built, trained and run (tests/backbones/test_backbones.py checks an FPN on every backbone that
has maps at strides 4-32)."""
import math

import pytest
import torch
from torchvision.ops import batched_nms

from detkit.config import ConfigError, from_dict
from detkit.models.assembly import build_detector
from detkit.models.rpn import AnchorSettings, RegionProposalNetwork, RPNSettings
from detkit.models.transform import ImageList
from detkit.ops.roi import assign_levels

TINY = {"name": "tiny", "args": {"widths": [8, 16, 16, 32, 32], "hidden": 32}}
FPN = {"name": "fpn", "in_strides": [4, 8, 16], "out_channels": 16, "extra_levels": 1}
RPN = {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128]}, "straddle_thresh": -1, "min_size": 1,
       "pre_nms_top_n_train": 100, "post_nms_top_n_train": 60, "pre_nms_top_n_test": 50, "post_nms_top_n_test": 30}
IMAGES = [torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), torch.randint(0, 255, (3, 80, 112), dtype=torch.uint8)]
TARGETS = [{"boxes": torch.tensor([[10.0, 10, 40, 50], [60, 20, 120, 90]]), "labels": torch.tensor([1, 2])},
           {"boxes": torch.tensor([[5.0, 5, 20, 18]]), "labels": torch.tensor([3])}]


def model_cfg(**model):
    base = {"backbone": TINY, "neck": FPN, "proposal_generator": RPN, "roi_extractor": {"name": "roi_align",
            "sampling_ratio": 2}, "box_head": {"name": "two_fc", "fc_dim": 32},
            "roi_heads": {"batch_size_per_image": 16}, "transform": {"min_size": 96, "max_size": 128}}
    return from_dict({"model": {**base, **model}}).model


def test_levels_follow_the_papers_formula():
    # k = floor(4 + log2(sqrt(wh) / 224)), clamped to [2, 5] for strides 4..32.
    sides = [224.0, 223.0, 112.0, 448.0, 1000.0, 10.0, 0.0, 160.0 * 2.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    expected = [min(5, max(2, math.floor(4 + math.log2(s / 224)))) - 2 if s > 0 else 0 for s in sides]
    assert assign_levels(boxes, [4, 8, 16, 32]).tolist() == expected == [2, 1, 1, 3, 3, 0, 0, 2]
    wide = torch.tensor([[0.0, 0.0, 448.0, 112.0]])  # sqrt(wh) = 224: the canonical level
    assert assign_levels(wide, [4, 8, 16, 32]).tolist() == [2]


def reference_proposals(rpn, deltas, anchors, scores, counts, image_sizes, pre_n, post_n):
    """The FPN RPN's filtering written level by level (torchvision's order of steps)."""
    out = []
    for b, (h, w) in enumerate(image_sizes):
        boxes, kept_scores, levels, start = [], [], [], 0
        for level, n in enumerate(counts):
            s = scores[b, start:start + n]
            top = s.topk(min(pre_n, n)).indices + start
            decoded = rpn.box_coder.decode(deltas[b, top], anchors[top])
            decoded[:, 0::2] = decoded[:, 0::2].clamp(0, w)
            decoded[:, 1::2] = decoded[:, 1::2].clamp(0, h)
            boxes.append(decoded), kept_scores.append(scores[b, top])
            levels.append(torch.full((len(top),), level))
            start += n
        boxes, kept_scores, levels = torch.cat(boxes), torch.cat(kept_scores), torch.cat(levels)
        wide = ((boxes[:, 2] - boxes[:, 0]) >= rpn.cfg.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= rpn.cfg.min_size)
        boxes, kept_scores, levels = boxes[wide], kept_scores[wide], levels[wide]
        keep = batched_nms(boxes, kept_scores, levels, rpn.cfg.nms_thresh)[:post_n]
        out.append(boxes[keep])
    return out


def test_multilevel_rpn_filtering_matches_a_per_level_reference():
    torch.manual_seed(0)
    cfg = RPNSettings(anchors=AnchorSettings(sizes=[16, 32, 64], aspect_ratios=[0.5, 1.0, 2.0]), min_size=2.0,
                      pre_nms_top_n_test=40, post_nms_top_n_test=25)
    rpn = RegionProposalNetwork(cfg, 8, [4, 8, 16]).eval()
    features = [torch.randn(2, 8, 24, 32), torch.randn(2, 8, 12, 16), torch.randn(2, 8, 6, 8)]
    images = ImageList(torch.zeros(2, 3, 96, 128), [(96, 128), (90, 120)], [1.0, 1.0])
    objectness, deltas, anchors, counts = rpn.predict(features)
    assert counts == [24 * 32 * 3, 12 * 16 * 3, 6 * 8 * 3] and anchors.shape == (sum(counts), 4)
    # one anchor size per level, centred on the level's cells
    assert torch.allclose((anchors[:3, 2:] - anchors[:3, :2]).prod(1), torch.full((3,), 16.0 * 16), rtol=1e-5)
    got, _ = rpn(images, features)
    expected = reference_proposals(rpn, deltas, anchors, objectness, counts, images.image_sizes, 40, 25)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_fpn_refuses_a_backbone_without_the_strides(registries):
    with pytest.raises(ConfigError, match=r"has no map at stride \[32\].*stage5 \(stride 16, 32 channels\)"):
        build_detector(model_cfg(neck={"name": "fpn"}), registries, 3)
    with pytest.raises(ConfigError, match="takes one anchor size per level"):
        build_detector(model_cfg(proposal_generator={**RPN, "anchors": {"sizes": [32, 64]}}), registries, 3)
    with pytest.raises(ConfigError, match="the neck gives 16; use a light box head"):
        build_detector(model_cfg(box_head="backbone"), registries, 3)
    with pytest.raises(ConfigError, match="R-CNN runs the whole CNN on each warped window; it takes no neck"):
        build_detector(model_cfg(detector="rcnn", proposal_generator="selective_search",
                                 roi_extractor={"name": "warp"}), registries, 3)


@pytest.mark.parametrize("extractor", [{"name": "roi_align", "sampling_ratio": 2}, {"name": "roi_pool"},
                                       {"name": "spp", "levels": [2, 1]}])
def test_faster_rcnn_with_fpn_trains_and_detects(registries, extractor):
    torch.manual_seed(0)
    model = build_detector(model_cfg(roi_extractor=extractor), registries, 3, ["a", "b", "c"])
    assert [m.shape[1] for m in model.trunk(torch.zeros(1, 3, 64, 64))] == [16] * 4
    model.train()
    losses = model(IMAGES, TARGETS)
    assert set(losses) == {"rpn/objectness", "rpn/box_reg", "roi/cls", "roi/box_reg"}
    sum(losses.values()).backward()
    lateral = model.trunk.neck.lateral[0].weight
    assert lateral.grad is not None and lateral.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(IMAGES)
    assert all(d["boxes"].shape[1] == 4 and len(d["boxes"]) <= 100 for d in dets)


def test_regions_are_pooled_from_the_level_of_their_size(registries):
    model = build_detector(model_cfg(), registries, 3, ["a", "b", "c"]).eval()
    extractor = model.roi_heads.roi_extractor
    assert extractor.strides == [4, 8, 16]  # P2-P4; the extra P5 serves the RPN only
    maps = [torch.zeros(1, 16, 24, 32), torch.ones(1, 16, 12, 16), torch.full((1, 16, 6, 8), 2.0),
            torch.full((1, 16, 3, 4), 3.0)]
    boxes = [torch.tensor([[0.0, 0.0, 20, 20], [0.0, 0.0, 120, 120], [10.0, 10, 50, 40], [0.0, 0.0, 250, 250]])]
    pooled = extractor(maps, boxes)
    # 20 px -> P2 (zeros), 120 px -> P3 (ones), ~35 px -> P2, 250 px -> P4 (twos), never the RPN-only P5
    assert pooled[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 2.0]


def test_fast_rcnn_with_fpn_on_given_proposals_and_conv_fc_head(registries):
    torch.manual_seed(0)
    cfg = model_cfg(detector="fast_rcnn", proposal_generator="selective_search",
                    box_head={"name": "conv_fc", "num_conv": 2, "conv_dim": 8, "fc_dim": 16})
    model = build_detector(cfg, registries, 3, ["a", "b", "c"])
    proposals = [torch.tensor([[4.0, 4, 40, 40], [0, 0, 120, 90], [30, 10, 50, 60]]), torch.tensor([[2.0, 3, 30, 30]])]
    model.train()
    losses = model(IMAGES, TARGETS, proposals)
    assert set(losses) == {"roi/cls", "roi/box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        pooled, vectors = model.extract_region_features(IMAGES, proposals)
    assert vectors.shape == (4, 16) and pooled.shape[0] == 4
    with pytest.raises(ConfigError, match="conv_fc' convolves a pooled grid"):
        build_detector(model_cfg(roi_extractor={"name": "spp"}, box_head="conv_fc"), registries, 3)


def test_two_fc_head_on_a_c4_backbone(registries):
    """A light head on the paper's single map: the backbone's RoI head is left out of the model."""
    cfg = from_dict({"model": {"backbone": TINY, "box_head": {"name": "two_fc", "fc_dim": 24},
                               "proposal_generator": {"name": "rpn", "anchors": {"sizes": [32, 64]}},
                               "transform": {"min_size": 96, "max_size": 128}}}).model
    model = build_detector(cfg, registries, 3)
    assert model.roi_heads.box_head[1].in_features == 32 * 7 * 7 and model.roi_heads.predictor.cls_score.in_features == 24
    assert not any(name.startswith("roi_heads.box_head.0.") for name, _ in model.named_parameters())


@pytest.mark.slow
def test_torchvision_fasterrcnn_resnet50_fpn_weights_give_the_same_detections(tmp_path, registries):
    """A state dict saved by torchvision's own model (built with weights=None here) converted by
    `detkit convert torchvision` detects exactly what torchvision detects on the same image."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from detkit.cli import main
    from detkit.models.loading import model_from_checkpoint

    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=256,
                                 max_size=512).eval()
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.bias[1:5] += 4.0  # confident detections from random weights
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "detkit.pth"
    assert main(["convert", "torchvision", str(tmp_path / "tv.pth"), "--output", str(out), "--min-size", "256",
                 "--max-size", "512"]) == 0
    assert main(["convert", "torchvision", str(tmp_path / "tv.pth"), "--output", str(out)]) == 2  # exists
    model, cfg, ckpt = model_from_checkpoint(str(out), registries, torch.device("cpu"))
    assert ckpt["class_names"][0] == "person" and ckpt["cat_ids"][:3] == [1, 2, 3] and len(ckpt["cat_ids"]) == 90
    # Exactly with torchvision's RoIAlign kernel; with detkit's CPU kernel (the default) to float rounding.
    for image, tol, sparse in ((torch.rand(3, 256, 384), 0.0, False), (torch.rand(3, 200, 300), 0.02, False),
                               (torch.rand(3, 256, 384), 1e-3, True)):  # scale 1, resized, and the sparse kernel
        model.roi_heads.roi_extractor.cpu_sparse = sparse
        with torch.no_grad():
            theirs, ours = tv([image])[0], model([image])[0]
        assert len(theirs["boxes"]) == len(ours["boxes"]) > 10
        assert torch.equal(theirs["labels"], ours["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=tol, rtol=0)
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=max(tol / 100, 1e-6), rtol=0)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert main(["convert", "torchvision", str(tmp_path / "other.pth"), "--output", str(tmp_path / "x.pth")]) == 2
    _eval_on_coco_subset(out, model, list(ckpt["class_names"]), tmp_path, main)


def _eval_on_coco_subset(checkpoint, model, names, tmp_path, main):
    """`detkit eval` of the converted 91-slot COCO model on a COCO json with two of COCO's 80 classes
    (their own ids; two the model detects on these images) and "person": labels are matched by name,
    only those classes are scored."""
    import json

    import cv2
    import numpy as np

    (tmp_path / "images").mkdir()
    gray = [np.random.default_rng(i).integers(0, 255, (256, 384, 1), dtype=np.uint8).repeat(3, 2) for i in range(2)]
    for i, image in enumerate(gray):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), image)
    with torch.no_grad():
        labels = model([torch.from_numpy(gray[0]).permute(2, 0, 1).float() / 255])[0]["labels"]
    found, counts = labels.unique(return_counts=True)
    kept = found[counts.argsort(descending=True)][:2].tolist()  # torchvision's label k is COCO category id k
    categories = [{"id": 1, "name": "person"}] + [{"id": k, "name": names[k - 1]} for k in kept if k != 1]
    gt = {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": 384, "height": 256} for i in range(2)],
          "annotations": [{"id": 1, "image_id": 1, "category_id": categories[-1]["id"], "bbox": [10, 20, 50, 40],
                           "area": 2000,
                           "iscrowd": 0}], "categories": categories}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = ["eval", str(checkpoint), "--data", str(tmp_path / "gt.json"), "--images", str(tmp_path / "images"),
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {c["id"] for c in categories}
    assert set(kept) <= {r["category_id"] for r in results if r["image_id"] == 1} <= {1, *kept}  # others dropped
    categories.append({"id": 99, "name": "unicorn"})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert main([*args, "--output", str(tmp_path / "ev2")]) == 2  # a class the model does not have


def test_label_categories_match_classes_by_name():
    from detkit.evaluation.runner import label_categories

    assert label_categories(["a", "b"], ["a", "b"], [7, 9]) == [7, 9]
    assert label_categories(["a", "N/A", "b", "c"], ["c", "a"], [5, 6]) == [6, None, None, 5]
    with pytest.raises(ConfigError, match=r"\['z'\] are not among the model's 2 classes"):
        label_categories(["a", "b"], ["a", "z"], [1, 2])


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11", "densenet121", "googlenet", "alexnet_tv"])
def test_a_short_fpn_training_run_per_family(registries, backbone):
    """One backbone per family with maps at strides 4-32: FPN P2-P6, two_fc head, two SGD steps lower
    nothing to NaN and move the neck's weights."""
    torch.manual_seed(0)
    cfg = model_cfg(backbone={"name": backbone}, neck={"name": "fpn", "out_channels": 16},
                    proposal_generator={**RPN, "anchors": {"sizes": [16, 32, 64, 128, 256]}},
                    transform={"min_size": 128, "max_size": 128})
    model = build_detector(cfg, registries, 3, ["a", "b", "c"]).train()
    assert [g.stride for g in model.proposal_generator.anchor_generators] == [4, 8, 16, 32, 64]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    before = model.trunk.neck.output[0].weight.detach().clone()
    for _ in range(2):
        losses = model(IMAGES[:1], TARGETS[:1])
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert not torch.equal(before, model.trunk.neck.output[0].weight)
