"""The backbone contract, written once and run once per registered backbone.

``check_backbone_contract`` is the contract every backbone honours (classifier logits, the detection parts'
declared channels and stride, parameters shared with the classifier, one training step reaching the first
layer). Each built-in family's own file runs it on every backbone of its family, at the family's input
sizes, and adds that family's exact expectations (trunk sides, the cut, stage layout):
``FAMILY_FILES`` below. This file runs it on the backbones of any other plugin (timm-style, parametrised
over the registry), so that a new plugin's backbones are checked without a file of their own; and checks
that together these cover every registered backbone exactly once.
"""
import importlib

import pytest
import torch
from torch import nn

from registry_utils import shared_registries

REGISTRY = shared_registries()  # names to parametrise over, at collection
# plugin -> the test module that runs the contract over that plugin's backbones (its NAMES)
FAMILY_FILES = {"classic": "test_backbones_classic", "densenet": "test_backbones_densenet",
                "inception": "test_backbones_inception", "resnet": "test_backbones_resnet",
                "tiny": "test_tiny_backbone"}
OTHERS = [e.name for e in REGISTRY.backbones.entries() if e.plugin not in FAMILY_FILES]


def input_side(model) -> int:
    """The contract's input side: the declared minimum, or the native size capped at 64."""
    d = model.defaults
    return max(d.min_input_size, min(64, d.input_size[1]))


def check_backbone_contract(model: nn.Module, x: torch.Tensor, num_classes: int = 7):
    """Assert the backbone contract on ``model`` (built with ``num_classes``) for the batch ``x`` of two
    images; returns ``(parts, feats)``, the detection parts and the trunk's features of ``x``, for the
    family's own checks. Leaves the model in training mode with the gradients of one step."""
    assert x.shape[0] == 2
    model.eval()
    parts = model.detection_parts()
    parts.trunk.eval(), parts.box_head.eval()
    r = model.defaults.roi_output_size
    h, w = x.shape[-2:]
    with torch.no_grad():
        logits = model(x)
        feats = parts.trunk(x)
        # The declared stride: growing the input by 2 strides grows the feature map by 2 cells.
        grown = parts.trunk(torch.zeros(1, x.shape[1], h + 2 * parts.stride, w + 2 * parts.stride))
        pooled = parts.box_head(torch.randn(3, parts.out_channels, r, r))
    assert logits.shape == (2, num_classes)  # eval: main logits only
    assert feats.shape[:2] == (2, parts.out_channels)
    assert grown.shape[-2:] == (feats.shape[-2] + 2, feats.shape[-1] + 2), (parts.stride, feats.shape, grown.shape)
    assert pooled.shape == (3, parts.head_channels)
    # The detection parts are views of the classifier, not copies.
    own = {id(p) for p in model.parameters()}
    trunk_params = {id(p) for p in parts.trunk.parameters()}
    assert trunk_params and trunk_params <= own and {id(p) for p in parts.box_head.parameters()} <= own
    assert all(id(p) in trunk_params for st in parts.stages for p in st.parameters())
    # One training step: gradients reach the first layer.
    model.train()
    model.zero_grad(set_to_none=True)
    model.classification_loss(model(x), torch.tensor([1, 2])).backward()
    first = next(p for p in model.parameters() if p.dim() > 1)
    assert first.grad is not None and first.grad.abs().sum() > 0
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    check_feature_stages(model, x)
    return parts, feats


def check_feature_stages(model: nn.Module, x: torch.Tensor) -> None:
    """The feature maps the backbone declares (``feature_stages()``) against real outputs: each stage's
    channels, and its stride (growing the input by two of the largest strides grows a stride-s map by
    2 * top / s cells); the stages share the classifier's parameters and include the whole trunk."""
    try:
        stages = model.feature_stages()
    except NotImplementedError:
        # Only a backbone that exposes no trunk stages either (timm's forward_intermediates fallback).
        assert not model.detection_parts().stages, f"{type(model).__name__} declares no feature stages"
        return
    model.eval()
    own = {id(p) for p in model.parameters()}
    stage_params = {id(p) for st in stages.stages for p in st.parameters()}
    assert stage_params <= own, "feature stages must share the classifier's parameters"
    assert {id(p) for p in model.detection_parts().trunk.parameters()} <= stage_params
    strides = [info.stride for info in stages.info]
    assert strides == sorted(strides), f"strides must not decrease: {strides}"
    top = strides[-1]
    side = max(x.shape[-1], 3 * top)  # the deepest map at least a few cells
    a = torch.randn(1, x.shape[1], side, side)
    b = torch.zeros(1, x.shape[1], side + 2 * top, side + 2 * top)
    maps = []
    with torch.no_grad():
        for stage, info in zip(stages.stages, stages.info):
            a, b = stage(a), stage(b)
            maps.append(a)
            assert a.shape[1] == info.channels, (info, tuple(a.shape))
            grown = 2 * top // info.stride
            assert (b.shape[-2] - a.shape[-2], b.shape[-1] - a.shape[-1]) == (grown, grown), \
                (info, tuple(a.shape), tuple(b.shape))
    check_fpn(stages, maps)


def check_fpn(stages, maps: list[torch.Tensor]) -> None:
    """An FPN on the declared stages: P2-P5 at the sides of C2-C5 and P6 half of P5, for a backbone with maps
    at strides 4-32; otherwise refused with the strides it lacks."""
    from detkit.config import ConfigError
    from detkit.models.fpn import FeatureBody, FeaturePyramid, FPNSettings

    settings = FPNSettings(out_channels=8)
    if not {4, 8, 16, 32} <= {info.stride for info in stages.info}:
        with pytest.raises(ConfigError, match="has no map at stride"):
            FeaturePyramid(stages, settings)
        return
    fpn = FeaturePyramid(stages, settings).eval()
    assert [info.stride for info in fpn.out_info] == [4, 8, 16, 32, 64] and fpn.roi_levels == 4
    assert FeatureBody(stages, fpn.in_indices).indices == fpn.in_indices
    with torch.no_grad():
        out = fpn([maps[i] for i in fpn.in_indices])
    assert [tuple(p.shape[1:]) for p in out[:4]] == [(8, *maps[i].shape[-2:]) for i in fpn.in_indices]
    assert tuple(out[4].shape[-2:]) == tuple((s + 1) // 2 for s in out[3].shape[-2:])


def test_every_registered_backbone_has_one_contract_test():
    names = [e.name for e in REGISTRY.backbones.entries()]
    covered = list(OTHERS)
    for plugin, module in FAMILY_FILES.items():
        family = importlib.import_module(module).NAMES
        assert sorted(family) == sorted(e.name for e in REGISTRY.backbones.entries() if e.plugin == plugin), module
        covered += family
    assert sorted(covered) == sorted(names)  # none left out, none twice


NO_OTHERS = pytest.param(None, marks=pytest.mark.skip(reason="every registered backbone belongs to a family "
                                                             "whose own file runs the contract"))


@pytest.mark.parametrize("name", OTHERS or [NO_OTHERS])
def test_backbone_contract(name):
    torch.manual_seed(0)
    model = REGISTRY.backbones.build(name, num_classes=7)
    s = input_side(model)
    check_backbone_contract(model, torch.randn(2, model.defaults.input_size[0], s, s))
