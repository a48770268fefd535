"""Every registered backbone honours the backbone contract (timm-style, parametrised over the registry)."""
import pytest
import torch

from detkit.plugins import get_registries

REGISTRY = get_registries()
NAMES = [e.name for e in REGISTRY.backbones.entries()]


def input_side(model) -> int:
    d = model.defaults
    return max(d.min_input_size, min(64, d.input_size[1]))


def trunk_side(trunk, channels: int, side: int) -> int:
    with torch.no_grad():
        return trunk(torch.zeros(1, channels, side, side)).shape[-1]


@pytest.mark.parametrize("name", NAMES)
def test_backbone_contract(name):
    torch.manual_seed(0)
    model = REGISTRY.backbones.build(name, num_classes=7)
    s = input_side(model)
    x = torch.randn(2, model.defaults.input_size[0], s, s)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 7)
    parts = model.detection_parts()
    with torch.no_grad():
        feats = parts.trunk(x)
    assert feats.shape[1] == parts.out_channels
    # The declared stride: growing the input by 2 strides grows the feature map by 2 cells.
    c = x.shape[1]
    grown = trunk_side(parts.trunk, c, s + 2 * parts.stride) - trunk_side(parts.trunk, c, s)
    assert grown == 2, (parts.stride, grown)
    r = model.defaults.roi_output_size
    with torch.no_grad():
        pooled = parts.roi_head(torch.randn(3, parts.out_channels, r, r))
    assert pooled.shape == (3, parts.head_channels)
    own = {id(p) for p in model.parameters()}
    shared = list(parts.trunk.parameters()) + list(parts.roi_head.parameters())
    assert shared and all(id(p) in own for p in shared)
    assert all(any(p is q for q in parts.trunk.parameters()) for st in parts.stages for p in st.parameters())
    # One training step: gradients reach the first layer.
    model.train()
    out = model(x)
    loss = model.classification_loss(out, torch.tensor([1, 2]))
    loss.backward()
    first = next(p for p in model.parameters() if p.dim() > 1)
    assert first.grad is not None and first.grad.abs().sum() > 0
