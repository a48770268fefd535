"""A short Faster R-CNN training run with one backbone of each registered family."""
import pytest
import torch

from detkit.config import ModelConfig, PartConfig
from detkit.models.assembly import build_detector
from registry_utils import shared_registries

FAMILIES = sorted({e.info.get("family", e.name) for e in shared_registries().backbones.entries()})
SLOW = {"fractalnet"}  # fractalnet34: 8 s


def smallest_member(registries, family: str) -> str:
    """The smallest registered member of ``family``, which stands for it (the first by name of equal sizes);
    measured on the meta device when the test runs, so that collecting builds no model."""
    sizes = {}
    for entry in registries.backbones.entries():
        if entry.info.get("family", entry.name) == family:
            with torch.device("meta"):
                sizes[entry.name] = sum(p.numel() for p in entry.builder(num_classes=10).parameters())
    return min(sizes, key=sizes.get)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES])
def test_faster_rcnn_trains_with_backbone(family, registries):
    name = smallest_member(registries, family)
    torch.manual_seed(0)
    cfg = ModelConfig()
    cfg.backbone.name = name
    cfg.transform.min_size, cfg.transform.max_size = 128, 160
    cfg.proposal_generator = PartConfig("rpn", {"anchors": {"sizes": [32.0, 64.0]}, "pre_nms_top_n_train": 200,
                                                "post_nms_top_n_train": 50, "min_size": 1})
    cfg.roi_heads = {"batch_size_per_image": 16}  # a slot section, bound when the detector is built
    model = build_detector(cfg, registries, num_classes=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    image = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)
    # sample_seed: both steps sample the same anchors and RoIs from the same proposals' matches
    target = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([2]), "sample_seed": 0}
    model.train()
    history = []
    for step in range(2):
        torch.manual_seed(1)  # the same dropout (and FractalNet drop-path) draws in both steps
        losses = model([image], [target])
        assert set(losses) == {"rpn/objectness", "rpn/box_reg", "roi/cls", "roi/box_reg"}
        assert all(torch.isfinite(v) and v >= 0 for v in losses.values()), losses
        assert losses["rpn/objectness"] > 0 and losses["roi/cls"] > 0, losses
        history.append({k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        sum(losses.values()).backward()
        if step == 0:
            # Gradients reach the trunk's first layer (nothing is frozen here), the RPN and the box predictor.
            first = next(model.trunk.parameters())
            assert first.requires_grad and first.grad is not None and first.grad.abs().sum() > 0
            for part in (model.proposal_generator, model.roi_heads.predictor):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
        opt.step()
    # One step on a fixed batch lowers the RPN's loss and the RoI classification loss.
    before, after = history
    assert after["rpn/objectness"] + after["rpn/box_reg"] < before["rpn/objectness"] + before["rpn/box_reg"], history
    assert after["roi/cls"] < before["roi/cls"], history
    model.eval()
    with torch.no_grad():
        det = model([image])[0]
    n = len(det["scores"])
    assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and n <= cfg.roi_heads.detections_per_img
    assert ((det["labels"] >= 1) & (det["labels"] <= 3)).all() and (det["scores"] >= cfg.roi_heads.score_thresh).all()
    boxes = det["boxes"]  # clipped to the image, in its own (not the resized) coordinates
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 128).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
