"""The tiny backbone honours the backbone contract (declared channels/stride, shared parameters)."""
import torch


def test_tiny_contract(registries):
    model = registries.backbones.build("tiny", num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    assert model(x).shape == (2, 7)
    parts = model.detection_parts()
    feats = parts.trunk(x)
    assert feats.shape == (2, parts.out_channels, 64 // parts.stride, 96 // parts.stride)
    s = model.defaults.roi_output_size
    assert parts.roi_head(torch.randn(3, parts.out_channels, s, s)).shape == (3, parts.head_channels)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in list(parts.trunk.parameters()) + list(parts.roi_head.parameters()))
    model(x).sum().backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
