"""The dense/fractal plugin: the backbone contract (test_backbones.py) for every name, DenseNet against
torchvision (counts, checkpoints, old key layout, the detection cut), DenseNet-BC's paper size,
memory-efficient checkpointing, and FractalNet's expansion rule and drop-path (Larsson et al. 2017, Sec. 2
and 3.1)."""
import functools

import pytest
import torch
import torchvision
from torch import nn

from detkit.backbones import count_parameters
from detkit_densenet.fractalnet import DropPath, FractalBlock, FractalNet, join, sample_drop_path
from registry_utils import shared_registries
from test_backbones import check_backbone_contract, input_side

REGISTRY = shared_registries()  # names to parametrise over, at collection
NAMES = [e.name for e in REGISTRY.backbones.entries() if e.plugin == "densenet"]
TORCHVISION = ["densenet121", "densenet169", "densenet201", "densenet161"]


@functools.lru_cache(maxsize=None)
def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return REGISTRY.backbones.build(name, num_classes=7)


def test_registers_the_family():
    assert set(NAMES) == {*TORCHVISION, "densenet_bc_100_12", "fractalnet_cifar", "fractalnet34"}


@pytest.mark.parametrize("name", NAMES)
def test_backbone_contract(name):
    model = built(name)
    side = input_side(model)  # 64, or 32 for the CIFAR forms
    parts, feats = check_backbone_contract(model, torch.randn(2, 3, side, side))
    assert feats.shape[-1] in (side // parts.stride, -(-side // parts.stride))
    assert parts.stages


@pytest.mark.parametrize("name", TORCHVISION)
def test_densenet_matches_torchvision_and_loads_its_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None).eval()
    ours = REGISTRY.backbones.build(name).eval()
    assert count_parameters(ours) == count_parameters(tv)  # e.g. densenet121: 7,978,856
    assert [k for k in ours.state_dict()] == [k for k in tv.state_dict()]
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert ours.load_pretrained(tmp_path / "tv.pth", strict=True) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))
        if name == "densenet121":
            # The trunk is torchvision's features up to transition3's 1x1 convolution, before its pooling.
            f = tv.features
            expected = f.transition3.conv(f.transition3.relu(f.transition3.norm(f[:9](x))))
            torch.testing.assert_close(ours.detection_parts().trunk(x), expected)


def test_densenet_detection_cut_channels():
    expected = {"densenet121": (512, 1024), "densenet169": (640, 1664), "densenet201": (896, 1920),
                "densenet161": (1056, 2208), "densenet_bc_100_12": (150, 342)}
    for name, (out_channels, head_channels) in expected.items():
        parts = built(name).detection_parts()
        assert (parts.out_channels, parts.head_channels) == (out_channels, head_channels), name
        assert parts.stride == (2 if name == "densenet_bc_100_12" else 16)


def test_densenet_loads_old_style_torchvision_keys(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    # torchvision's original checkpoints spell denselayerN.norm1 as denselayerN.norm.1 (and conv.2, ...)
    old = {}
    for k, v in tv.state_dict().items():
        if ".denselayer" in k:
            for part in ("norm1", "norm2", "conv1", "conv2"):
                k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        old[k] = v
    assert "features.denseblock1.denselayer1.norm.1.running_var" in old
    torch.save(old, tmp_path / "old.pth")
    ours = built("densenet121")
    fresh = REGISTRY.backbones.build("densenet121").eval()
    assert fresh.load_pretrained(tmp_path / "old.pth", strict=True) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tv(x))
    assert ours is not fresh


def test_densenet_bc_100_12_is_the_papers_size():
    model = REGISTRY.backbones.build("densenet_bc_100_12", num_classes=10)
    # Huang et al. 2017, Table 2: DenseNet-BC (L = 100, k = 12), 0.8M parameters
    assert round(count_parameters(model) / 1e6, 1) == 0.8
    # L = 100 weighted layers: stem conv, 3 blocks of 16 two-convolution bottlenecks, 2 transitions, classifier
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == 1 + 3 * 16 * 2 + 2 + 1


def test_memory_efficient_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = REGISTRY.backbones.build("densenet_bc_100_12", num_classes=3)
    efficient = REGISTRY.backbones.build("densenet_bc_100_12", num_classes=3, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for model in (plain, efficient):
        model.train()
        model.classification_loss(model(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# --- FractalNet -----------------------------------------------------------------------------------


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _bn_eval(module: nn.Module) -> None:
    """BN in eval mode, so two forward passes of a training-mode block can be compared exactly."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


@pytest.mark.parametrize("columns", [1, 2, 3, 4])
def test_fractal_block_has_2_to_the_c_minus_1_convolutions(columns):
    assert FractalBlock(columns, 3, 4).num_convs() == 2**columns - 1


def test_fractal_network_sizes():
    for name, blocks in (("fractalnet_cifar", 5), ("fractalnet34", 4)):
        model = built(name)
        stem = 0 if name == "fractalnet_cifar" else 1
        assert len(_convs(model)) == stem + blocks * (2**4 - 1)
        # parameters from the description alone: each 3x3 convolution + BN (2 per channel), + the classifier;
        # in a block the first convolution of each of the C columns sees the block's input channels
        widths = model.widths
        cins = [3 if stem == 0 else 64, *widths[:-1]]
        expected = sum(4 * 9 * cin * w + 11 * 9 * w * w + 15 * 2 * w for cin, w in zip(cins, widths))
        expected += (64 * 3 * 49 + 2 * 64) * stem + widths[-1] * 7 + 7
        assert count_parameters(model) == expected
    assert built("fractalnet34").detection_parts().stride == 16
    # the paper's 20-layer CIFAR network: B = 5 blocks, deepest column 2^(C-1) = 4 convolutions per block
    assert len(_convs(REGISTRY.backbones.build("fractalnet_cifar", columns=3))) == 5 * 7


def test_eval_averages_all_columns_deterministically():
    torch.manual_seed(0)
    block = FractalBlock(3, 3, 4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        # f_3(z) = join(f_2(f_2(z)), conv(z)) with f_2(z) = join(conv(conv(z)), conv(z)), joins merged (Fig. 1)
        a, b = block.deep_in, block.deep_out
        mid = (a.shallow(x) + a.deep_out.shallow(a.deep_in.shallow(x))) / 2
        expected = (block.shallow(x) + b.shallow(mid) + b.deep_out.shallow(b.deep_in.shallow(mid))) / 3
        torch.testing.assert_close(block(x), expected)
        torch.testing.assert_close(block(x), block(x))
        model = built("fractalnet_cifar").eval()
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def _chain(block: FractalBlock, z: torch.Tensor, c: int) -> torch.Tensor:
    """Column c written out from the expansion rule: conv for c = 0, else column c-1 twice."""
    if c == 0:
        return block.shallow(z)
    return _chain(block.deep_out, _chain(block.deep_in, z, c - 1), c - 1)


def test_global_drop_path_runs_a_single_column():
    torch.manual_seed(0)
    block = FractalBlock(4, 3, 4).train()
    _bn_eval(block)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        for c in range(4):
            torch.testing.assert_close(block(x, DropPath("global", column=c)), _chain(block, x, c))


def test_global_drop_path_uses_the_same_column_in_every_block():
    torch.manual_seed(0)
    model = FractalNet((4, 4, 4), columns=3, num_classes=2, global_ratio=1.0).train()
    calls: list[int] = []
    handles = [m.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, m in enumerate(_convs(model))]
    block_of = [b for b, block in enumerate(model.blocks) for _ in _convs(block)]
    seen = set()
    for _ in range(12):
        calls.clear()
        model(torch.randn(2, 3, 16, 16))
        per_block = [sum(block_of[i] == b for i in calls) for b in range(3)]
        assert len(set(per_block)) == 1 and per_block[0] in (1, 2, 4), per_block  # 2^c convolutions of column c
        seen.add(per_block[0])
    for h in handles:
        h.remove()
    assert len(seen) > 1


def test_local_drop_path_never_drops_every_input_and_drops_at_the_rate():
    inputs = [torch.tensor([1.0]), torch.tensor([10.0]), torch.tensor([100.0])]
    # the mean identifies which inputs survived: every non-empty subset gives a distinct value
    subsets = {round(sum(v for v, k in zip((1, 10, 100), m) if k) / sum(m), 4): m
               for m in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)] if sum(m)}
    torch.manual_seed(0)
    for _ in range(200):
        assert round(join(inputs, DropPath("local", p=0.99)).item(), 4) in subsets
    dropped, n = 0, 2000
    for _ in range(n):
        kept = subsets[round(join(inputs, DropPath("local", p=0.15)).item(), 4)]
        dropped += 3 - sum(kept)
    assert abs(dropped / (3 * n) - 0.15) < 0.02
    torch.testing.assert_close(join(inputs, DropPath("local", p=0.0)), torch.tensor([37.0]))


def test_local_drop_path_in_a_block_keeps_a_path():
    torch.manual_seed(0)
    block = FractalBlock(3, 2, 2).train()
    _bn_eval(block)
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        out = block(x, DropPath("local", p=0.99))  # nearly every input dropped: one per join survives
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_local_and_global_are_mixed_half_and_half():
    torch.manual_seed(0)
    draws = [sample_drop_path(4, 0.15, 0.5) for _ in range(4000)]
    globals_ = [d.column for d in draws if d.kind == "global"]
    assert abs(len(globals_) / len(draws) - 0.5) < 0.03
    assert all(d.p == 0.15 for d in draws if d.kind == "local")
    assert sorted(set(globals_)) == [0, 1, 2, 3]


def test_fractal_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="dropout has 2 rates for 3 blocks"):
        FractalNet((4, 4, 4), dropout=(0.1, 0.2))
    with pytest.raises(ValueError, match="column 3 out of range"):
        FractalBlock(3, 2, 2).column(torch.zeros(1, 2, 4, 4), 3)
    with pytest.raises(ValueError, match="kind must be"):
        DropPath("path")
