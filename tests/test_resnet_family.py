"""Residual family specifics: shortcut options, paper parameter counts, stochastic depth, SE."""
import pytest
import torch

from detkit.plugins import get_registries
from detkit_resnet.resnet import ResidualBlock

REGISTRY = get_registries()


def count(model):
    return sum(p.numel() for p in model.parameters())


def build(name, **kw):
    with torch.device("meta"):
        return REGISTRY.backbones.build(name, **kw)


def test_shortcut_options_a_b_c():
    a, b, c = (count(build("resnet34", shortcut=s)) for s in "ABC")
    assert a < b < c
    assert b == 21_797_672
    x = torch.randn(1, 3, 64, 64)
    model = REGISTRY.backbones.build("resnet18", shortcut="A", num_classes=5).eval()
    assert model(x).shape == (1, 5)


@pytest.mark.parametrize("name,paper_millions", [
    ("preact_resnet164", 1.7), ("preact_resnet1001", 10.2), ("wrn28_10", 36.5), ("wrn40_4", 8.9),
    ("se_resnet50", 28.1)])
def test_paper_parameter_counts(name, paper_millions):
    # Counts as the papers state them (CIFAR forms with 10 classes), to their printed precision.
    n = count(build(name))
    assert abs(n / 1e6 - paper_millions) < 0.15, n


def test_stochastic_depth_survival_is_linear_and_behaves():
    model = REGISTRY.backbones.build("resnet18", stochastic_depth=0.5, num_classes=3)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    survival = [b.survival for b in blocks]
    expected = [1 - (i + 1) / len(blocks) * 0.5 for i in range(len(blocks))]
    assert survival == pytest.approx(expected) and survival[-1] == pytest.approx(0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # deterministic at test time (scaled residuals)
    tiny = REGISTRY.backbones.build("resnet18", stochastic_depth=0.01, num_classes=3).train()
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        outs.append(tiny(x).detach())
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # different blocks dropped per mini-batch
    with pytest.raises(ValueError, match="stochastic_depth"):
        REGISTRY.backbones.build("resnet18", stochastic_depth=0.0)


def test_squeeze_excitation_gates_channels():
    model = REGISTRY.backbones.build("se_resnet18", num_classes=3).eval()
    block = model.layer1[0]
    assert block.se is not None and block.se.fc1.out_features == 64 // 16
    x = torch.randn(1, 64, 8, 8)
    gated = block.se(x)
    ratio = gated / x
    # One gate in (0, 1) per channel, the same over all positions.
    assert ((ratio > 0) & (ratio < 1)).all() and torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio))
