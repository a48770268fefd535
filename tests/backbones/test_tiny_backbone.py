"""The tiny backbone: the backbone contract (test_backbones.py) on a non-square input, where the trunk's map is
exactly H/stride x W/stride."""
import torch

from test_backbones import check_backbone_contract

NAMES = ["tiny"]  # the tiny plugin's backbones (test_backbones.py checks this list against the registry)


def test_tiny_contract(registries):
    model = registries.backbones.build("tiny", num_classes=7)
    parts, feats = check_backbone_contract(model, torch.randn(2, 3, 64, 96))
    assert feats.shape == (2, parts.out_channels, 64 // parts.stride, 96 // parts.stride)
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
