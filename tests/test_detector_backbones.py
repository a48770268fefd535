"""A short Faster R-CNN training run with one backbone of each registered family."""
import pytest
import torch

from detkit.config import ModelConfig
from detkit.models.detector import build_detector
from detkit.plugins import get_registries

REGISTRY = get_registries()
# The smallest registered member of each family stands for it.
FAMILIES: dict[str, str] = {}
for entry in REGISTRY.backbones.entries():
    family = entry.info.get("family", entry.name)
    with torch.device("meta"):
        size = sum(p.numel() for p in entry.builder(num_classes=10).parameters())
    if family not in FAMILIES or size < FAMILIES[family][1]:
        FAMILIES[family] = (entry.name, size)


@pytest.mark.parametrize("name", sorted(n for n, _ in FAMILIES.values()))
def test_faster_rcnn_trains_with_backbone(name):
    torch.manual_seed(0)
    cfg = ModelConfig()
    cfg.backbone.name = name
    cfg.transform.min_size, cfg.transform.max_size = 128, 160
    cfg.anchors.sizes = [32.0, 64.0]
    cfg.rpn.pre_nms_top_n_train, cfg.rpn.post_nms_top_n_train = 200, 50
    cfg.rpn.min_size = 1
    cfg.roi_head.batch_size_per_image = 16
    model = build_detector(cfg, REGISTRY, num_classes=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    image = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([2])}
    model.train()
    for _ in range(2):
        losses = model([image], [target])
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        det = model([image])[0]
    assert det["boxes"].shape[1] == 4 and (det["labels"] >= 1).all()
