"""The parts that make R-CNN, SPP-net and Fast R-CNN: spatial pyramid pooling, warping with context
padding, truncated SVD, multi-scale testing, and their assembly from a config."""
import pytest
import torch
from torch import nn

from detkit.config import ConfigError, from_dict
from detkit.models.assembly import build_detector
from detkit.models.svd import compress_fully_connected, truncated_svd
from detkit.ops.spp import SpatialPyramidPool
from detkit.ops.warp import context_padded_boxes, warp_regions


@pytest.mark.parametrize("levels", [[6, 3, 2, 1], [4, 2, 1], [1]])
def test_spp_output_size_is_fixed_for_any_window(levels):
    spp = SpatialPyramidPool(levels, strides=16)
    features = torch.randn(2, 5, 20, 30)
    # Windows from sub-cell to whole-image, thin and wide: one vector length for all.
    boxes = [torch.tensor([[0, 0, 8, 8], [10, 20, 300, 40], [0, 0, 480, 320.]]),
             torch.tensor([[100, 100, 101, 300], [3, 5, 7, 9.]])]
    out = spp(features, boxes)
    assert out.shape == (5, 5 * sum(v * v for v in levels)) == (5, spp.out_features(5))


def test_spp_one_by_one_level_is_the_max_over_the_window():
    spp = SpatialPyramidPool([1], strides=1)
    features = torch.arange(2 * 6 * 8, dtype=torch.float32).view(1, 2, 6, 8)
    out = spp(features, [torch.tensor([[2, 1, 5, 3.]])])  # columns 2..5, rows 1..3
    assert torch.equal(out[0], features[0, :, 1:4, 2:6].amax(dim=(1, 2)))


def test_spp_levels_must_be_positive():
    with pytest.raises(ValueError, match="levels"):
        SpatialPyramidPool([4, 0])


def test_context_padding_leaves_p_pixels_around_the_box_at_the_warped_size():
    box = torch.tensor([[100.0, 50.0, 300.0, 150.0]])  # 200 x 100
    padded = context_padded_boxes(box, warp_size=227, context_padding=16)
    w, h = padded[0, 2] - padded[0, 0], padded[0, 3] - padded[0, 1]
    # The original box maps to 227 - 32 warped pixels, so 16 warped pixels of context on each side.
    assert torch.allclose((box[0, 0] - padded[0, 0]) * 227 / w, torch.tensor(16.0))
    assert torch.allclose((box[0, 1] - padded[0, 1]) * 227 / h, torch.tensor(16.0))
    assert torch.allclose(padded.view(2, 2).mean(0), box.view(2, 2).mean(0))  # same centre
    with pytest.raises(ValueError, match="no room"):
        context_padded_boxes(box, warp_size=32, context_padding=16)


def test_warp_crops_the_box_and_fills_outside_context_with_the_mean():
    image = torch.zeros(1, 3, 40, 40)
    image[:, :, 10:30, 10:30] = 1.0  # a bright square
    # Without context the square fills the window; with context the border is dark.
    tight = warp_regions(image, [torch.tensor([[10.0, 10.0, 30.0, 30.0]])], warp_size=16, context_padding=0)
    # (bilinear sampling blends the outermost samples with the neighbouring pixels)
    assert torch.allclose(tight[..., 1:-1, 1:-1], torch.ones(1, 3, 14, 14), atol=1e-5) and tight.min() > 0.8
    padded = warp_regions(image, [torch.tensor([[10.0, 10.0, 30.0, 30.0]])], warp_size=16, context_padding=4)
    assert padded[0, :, 4:12, 4:12].min() > 0.99 and padded[0, :, :2, :].max() < 1e-6
    # A box at the image corner: context beyond the image is zero (the mean after normalisation).
    corner = warp_regions(image + 1.0, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], warp_size=16, context_padding=4)
    assert corner[0, :, 0, 0].abs().max() < 1e-6 and corner[0, :, 8, 8].min() > 0.99


def test_truncated_svd_factorises_a_layer():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    low_rank = torch.randn(48, 8) @ torch.randn(8, 64)
    layer.weight.data = low_rank
    svd = truncated_svd(layer, 8)
    x = torch.randn(5, 64)
    assert torch.allclose(svd(x), layer(x), atol=1e-4)  # exact for a rank-8 matrix
    assert sum(p.numel() for p in svd.parameters()) == 8 * (64 + 48) + 48
    with pytest.raises(ValueError, match="rank 48"):
        truncated_svd(layer, 48)


def test_compress_fully_connected_replaces_fc6_and_fc7():
    head = nn.Sequential(nn.Flatten(1), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
    replaced = compress_fully_connected(head, [16, 8])
    assert len(replaced) == 2 and isinstance(head[1], nn.Sequential) and head[3][0].out_features == 8
    assert head(torch.randn(3, 32)).shape == (3, 24)
    with pytest.raises(ValueError, match="only 0 fully connected"):
        compress_fully_connected(nn.Sequential(nn.ReLU()), [4])


def _model_cfg(**model):
    base = {"backbone": {"name": "tiny", "args": {"widths": [8, 8, 16, 16, 16], "hidden": 32}},
            "transform": {"min_size": 64, "max_size": 96}}
    return from_dict({"model": {**base, **model}}).model


IMAGES = [torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8), torch.randint(0, 255, (3, 72, 64), dtype=torch.uint8)]
PROPOSALS = [torch.tensor([[4, 4, 40, 40], [0, 0, 80, 64], [30, 10, 50, 60.]]), torch.tensor([[2, 3, 30, 30.]])]
TARGETS = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 38.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[2.0, 2.0, 30.0, 33.0]]), "labels": torch.tensor([2])}]


@pytest.mark.parametrize("detector,extractor,extra", [
    ("fast_rcnn", {"name": "roi_pool"}, {}),
    ("fast_rcnn", {"name": "roi_align", "sampling_ratio": 2}, {}),
    ("spp_net", {"name": "spp", "levels": [3, 2, 1]}, {}),
    ("rcnn", {"name": "warp", "warp_size": 48, "context_padding": 4}, {"transform": {"min_size": 0}}),
])
def test_each_detector_trains_and_detects_on_given_proposals(registries, detector, extractor, extra):
    cfg = _model_cfg(detector=detector, proposal_generator="selective_search", roi_extractor=extractor,
                     roi_heads={"batch_size_per_image": 16}, **extra)
    model = build_detector(cfg, registries, 2, ["a", "b"])
    model.train()
    losses = model(IMAGES, TARGETS, PROPOSALS)
    assert set(losses) == {"roi/cls", "roi/box_reg"}
    sum(losses.values()).backward()
    first = next(p for p in model.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(IMAGES, None, PROPOSALS)
    for det, img in zip(dets, IMAGES):
        assert det["boxes"].shape[1] == 4 and (det["boxes"][:, 2] <= img.shape[2]).all()
    pooled, vectors = model.extract_region_features(IMAGES, PROPOSALS)
    assert pooled.shape[0] == vectors.shape[0] == 4 and vectors.shape[1] == 32


def test_multiscale_testing_pools_each_region_at_its_scale(registries):
    cfg = _model_cfg(detector="fast_rcnn", proposal_generator="selective_search",
                     transform={"min_size": 64, "max_size": 2000, "test_scales": [200, 400]},
                     roi_heads={"score_thresh": 0.0})
    model = build_detector(cfg, registries, 2, ["a", "b"]).eval()
    seen = []
    extractor = model.roi_heads.roi_extractor
    original = extractor.forward
    extractor.forward = lambda f, p, s=None: (seen.append((f.shape[-2:], sum(len(b) for b in p))), original(f, p, s))[1]
    with torch.no_grad():
        dets = model(IMAGES, None, PROPOSALS)
    assert sum(n for _, n in seen) == 4 and len(seen) >= 2  # every region pooled once, from several scales
    # Scaled by 200/64, the whole 80x64 image is ~224x224: it is pooled at the smaller scale, alone.
    assert [n for _, n in seen] == [1, 3]
    assert len(dets) == 2 and all(d["scores"].numel() > 0 for d in dets)


def test_multiscale_testing_puts_each_pooled_region_back_in_its_row(registries):
    # Regions whose order (per image, then within each image) differs from the order of their scales: the
    # large ones (area * s^2 closest to 224^2 at s = 200/64) go to the 200 level, the small ones to 400.
    cfg = _model_cfg(detector="fast_rcnn", proposal_generator="selective_search",
                     transform={"min_size": 64, "max_size": 2000, "test_scales": [200, 400]})
    model = build_detector(cfg, registries, 2, ["a", "b"]).eval()
    proposals = [torch.tensor([[4, 4, 20, 20], [0, 0, 80, 64], [30, 10, 40, 30.]]),  # 80x64: small, large, small
                 torch.tensor([[2, 3, 60, 70], [10, 10, 20, 30.]])]                # 64x72: large, small
    calls, seen = [], []

    def extractor(features, boxes, image_sizes):
        # A stand-in that "pools" each region as its boxes at the level and the level's first image height.
        calls.append((image_sizes, [b.tolist() for b in boxes]))
        return torch.cat([torch.cat([b, b.new_full((len(b), 1), image_sizes[0][0])], 1) for b in boxes])

    def classify(pooled):
        seen.append(pooled)
        return pooled.new_zeros(len(pooled), 3), pooled.new_zeros(len(pooled), 12)

    model.roi_heads.roi_extractor.forward = extractor
    model.roi_heads.classify = classify
    with torch.no_grad():
        dets = model(IMAGES, None, proposals)
    # Each level pools its regions image by image, in their coordinates at that level (x 3.125 and x 6.25).
    assert calls == [([(200, 250), (225, 200)], [[[0, 0, 250, 200]], [[6.25, 9.375, 187.5, 218.75]]]),
                     ([(400, 500), (450, 400)], [[[25, 25, 125, 125], [187.5, 62.5, 250, 187.5]],
                                                 [[62.5, 62.5, 125, 187.5]]])]
    # ... and row r of what is classified is region r (the order of the proposals), whatever its level.
    assert len(seen) == 1 and torch.equal(seen[0], torch.tensor([
        [25, 25, 125, 125, 400], [0, 0, 250, 200, 200], [187.5, 62.5, 250, 187.5, 400],
        [6.25, 9.375, 187.5, 218.75, 200], [62.5, 62.5, 125, 187.5, 400]]))
    # Zero deltas and equal scores: every region comes back once per class, in original-image coordinates.
    for det, props in zip(dets, proposals):
        assert sorted(map(tuple, det["boxes"].tolist())) == sorted(2 * list(map(tuple, props.tolist())))
        assert sorted(det["labels"].tolist()) == [1] * len(props) + [2] * len(props)


def test_named_detectors_check_their_parts(registries):
    with pytest.raises(ConfigError, match="detector 'fast_rcnn' takes 'selective_search' or 'precomputed'"):
        build_detector(_model_cfg(detector="fast_rcnn", proposal_generator="rpn"), registries, 2)
    with pytest.raises(ConfigError, match="detector 'spp_net' takes 'spp'"):
        build_detector(_model_cfg(detector="spp_net", roi_extractor="roi_pool"), registries, 2)
    # each names its paper's parts as defaults: SPP-net is selective search and a spatial pyramid
    model = build_detector(_model_cfg(detector="spp_net"), registries, 2)
    assert type(model.roi_heads.roi_extractor).__name__ == "SpatialPyramidPool"
    # two_stage takes any combination: an RPN with a spatial pyramid.
    model = build_detector(_model_cfg(detector="two_stage", roi_extractor={"name": "spp", "levels": [2, 1]}),
                           registries, 2)
    assert model.roi_heads.box_head[1].in_features == 16 * 5


def test_spp_needs_a_fully_connected_roi_head(registries):
    cfg = from_dict({"model": {"detector": "two_stage", "backbone": {"name": "resnet18"},
                               "roi_extractor": {"name": "spp"}}}).model
    with pytest.raises(ConfigError, match="not a fully connected layer"):
        build_detector(cfg, registries, 2)


def test_freeze_at_minus_one_freezes_the_whole_trunk(registries):
    model = build_detector(_model_cfg(backbone={"name": "tiny", "freeze_at": -1}), registries, 2)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())


def test_windows_smaller_than_a_pixel_still_give_features():
    image = torch.rand(1, 3, 20, 20)
    degenerate = [torch.tensor([[5.0, 5.0, 5.0, 5.0], [7.0, 7.0, 7.2, 7.1]])]
    windows = warp_regions(image, degenerate, warp_size=8, context_padding=1)
    assert windows.shape == (2, 3, 8, 8) and torch.isfinite(windows).all()
    pooled = SpatialPyramidPool([2, 1], strides=4)(torch.rand(1, 4, 5, 5), degenerate)
    assert pooled.shape == (2, 4 * 5) and torch.isfinite(pooled).all()
