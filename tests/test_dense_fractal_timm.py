"""DenseNet (torchvision checkpoints, old key layout), FractalNet drop-path, and the timm bridge."""
import sys
import textwrap

import pytest
import torch
import torchvision

from detkit.plugins import get_plugin_manager, get_registries
from detkit_densenet.fractalnet import DropPath, FractalBlock

REGISTRY = get_registries()


def test_densenet_loads_old_style_torchvision_keys(tmp_path):
    tv = torchvision.models.densenet121(weights=None).eval()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k: v
           for k, v in tv.state_dict().items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "old.pth")
    ours = REGISTRY.backbones.build("densenet121").eval()
    assert ours.load_pretrained(tmp_path / "old.pth") == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_densenet_bc_paper_size():
    n = sum(p.numel() for p in REGISTRY.backbones.build("densenet_bc_100_12").parameters())
    assert abs(n / 1e6 - 0.8) < 0.05  # Huang et al. 2017, Table 2: 0.8M


@pytest.mark.parametrize("columns", [1, 2, 3, 4])
def test_fractal_block_has_2c_minus_1_convolutions(columns):
    assert FractalBlock(columns, 3, 4).num_convs() == 2**columns - 1


def test_fractal_eval_is_deterministic_mean_of_columns():
    torch.manual_seed(0)
    block = FractalBlock(2, 3, 4).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        deep = block.deep_out.shallow(block.deep_in.shallow(x))  # column 1: two convolutions
        expected = (block.shallow(x) + deep) / 2
        torch.testing.assert_close(block(x), expected)
        torch.testing.assert_close(block(x), block(x))


def test_global_drop_path_runs_a_single_column():
    torch.manual_seed(0)
    block = FractalBlock(3, 3, 4).train()
    for m in block.modules():  # BN in eval so two runs can be compared exactly
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        block.drop = DropPath(("global", 0))
        torch.testing.assert_close(block(x), block.shallow(x))
        block.drop = DropPath(("global", 2))
        chain = lambda b, z: b.shallow(z) if b.columns == 1 else chain(b.deep_out, chain(b.deep_in, z))  # noqa: E731
        torch.testing.assert_close(block(x), chain(block, x))  # the deepest column: 4 convolutions in a row


def test_local_drop_path_never_drops_every_input():
    from detkit_densenet.fractalnet import join

    ones = [torch.ones(1), 2 * torch.ones(1)]
    for seed in range(50):
        torch.manual_seed(seed)
        out = join(ones, [0, 1], DropPath(("local", 0.99)), training=True)
        assert out.item() in (1.0, 2.0, 1.5)


FAKE_TIMM = '''
"""A stand-in for the few timm functions the bridge uses (list_models, create_model, feature_info,
forward_intermediates), with timm's signatures."""
import torch
from torch import nn

def list_models(filter="", pretrained=False):
    return ["fakenet"]

class FakeNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1),
                                     nn.Conv2d(16, 24, 3, 2, 1), nn.Conv2d(24, 32, 3, 2, 1), nn.Conv2d(32, 40, 3, 2, 1)])
        self.head = nn.Linear(40, num_classes)
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 1), module=f"stages.{i}")
                             for i, c in enumerate([8, 16, 24, 32, 40])]
        self.pretrained_cfg = dict(input_size=(3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        out = []
        for i, stage in enumerate(self.stages):
            x = torch.relu(stage(x))
            if i in indices:
                out.append(x)
            if stop_early and i >= max(indices):
                break
        return out

    def forward(self, x):
        for stage in self.stages:
            x = torch.relu(stage(x))
        return self.head(x.mean((2, 3)))

def create_model(model_name, pretrained=False, num_classes=1000, **kwargs):
    assert not pretrained
    return FakeNet(num_classes)
'''


def test_timm_bridge_registers_and_builds(tmp_path, monkeypatch):
    (tmp_path / "timm.py").write_text(textwrap.dedent(FAKE_TIMM))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    reg = get_registries(get_plugin_manager())
    entry = reg.backbones.get("timm/fakenet")
    assert entry.plugin == "timm"
    model = entry.builder(num_classes=3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    parts = model.detection_parts()
    assert parts.stride == 16 and parts.out_channels == 32
    assert parts.trunk(torch.randn(1, 3, 64, 64)).shape == (1, 32, 4, 4)
    assert parts.roi_head(torch.randn(2, 32, 7, 7)).shape == (2, parts.head_channels)


def test_timm_bridge_is_silent_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    reg = get_registries(get_plugin_manager())
    assert not [n for n in reg.backbones if n.startswith("timm/")]
