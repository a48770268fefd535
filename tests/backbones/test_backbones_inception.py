"""Inception family plugin (``detkit_inception``): the backbone contract (test_backbones.py) for every name it
registers, with its exact trunk sides; torchvision parity (parameter counts, checkpoints, ``transform_input``),
the auxiliary-loss combination and label smoothing against hand-computed values, the naive module and the
1x1-reduction cost of the notes, and the parameter counts pinned in the modules' docstrings."""
import math

import pytest
import torch
import torchvision
from torch import nn

from detkit.backbones import IMAGENET_MEAN, IMAGENET_STD, count_parameters
from detkit_inception.googlenet import Inception
from detkit_inception.inception_v4 import inception_resnet_v2
from registry_utils import shared_registries
from test_backbones import check_backbone_contract, input_side

REGISTRY = shared_registries()  # names to parametrise over, at collection
NAMES = [e.name for e in REGISTRY.backbones.entries() if e.plugin == "inception"]

# The contract's input side (test_backbones.input_side): 64, or the declared minimum of 75 for Inception-v3/v4
# and the Inception-ResNets. The padded networks reach H/16 exactly; the unpadded stems and reductions of
# v3/v4 lose cells (75 -> 3, 299 -> 17), as the module docstrings state.
TRUNK_SIDE = {"googlenet": (64, 4), "googlenet_v1": (64, 4), "googlenet_naive": (64, 4), "bn_inception": (64, 4),
              "inception_v3": (75, 3), "inception_v4": (75, 3), "inception_resnet_v1": (75, 3),
              "inception_resnet_v2": (75, 3)}


def test_plugin_registers_the_family():
    assert set(NAMES) == set(TRUNK_SIDE)
    assert all(REGISTRY.backbones.get(n).info["family"] == "inception" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_backbone_contract(name):
    torch.manual_seed(0)
    model = REGISTRY.backbones.build(name, num_classes=7)
    side, trunk_side = TRUNK_SIDE[name]
    assert side == input_side(model)
    # eval: main logits only, auxiliary classifiers discarded
    parts, feats = check_backbone_contract(model, torch.randn(2, 3, side, side))
    assert parts.stride == 16
    assert feats.shape == (2, parts.out_channels, trunk_side, trunk_side)
    assert [id(m) for m in parts.trunk] == [id(s) for s in parts.stages] and len(parts.stages) >= 3


@pytest.mark.parametrize("aux", [True, False])
def test_parameter_counts_equal_torchvision(aux):
    with torch.device("meta"):
        ours_g = REGISTRY.backbones.build("googlenet", aux_logits=aux)
        ours_v3 = REGISTRY.backbones.build("inception_v3", aux_logits=aux)
        tv_g = torchvision.models.googlenet(aux_logits=aux, init_weights=False)
        tv_v3 = torchvision.models.inception_v3(aux_logits=aux, init_weights=False)
    assert count_parameters(ours_g) == count_parameters(tv_g) == (13_004_888 if aux else 6_624_904)
    assert count_parameters(ours_v3) == count_parameters(tv_v3) == (27_161_264 if aux else 23_834_568)


@pytest.mark.parametrize("name,kwargs,expected", [
    ("inception_v4", {}, 42_679_816),  # timm/TF-slim inception_v4, listed as 42.7M
    ("inception_resnet_v2", {}, 55_843_464),  # the released (TF-slim) network, timm lists 55.8M
    ("inception_resnet_v1", {}, 22_756_328),  # the paper's Figs. 14-15 (no published count)
    ("bn_inception", {}, 11_285_224),  # the table of Ioffe & Szegedy's Fig. 5
    ("googlenet_v1", {}, 13_378_280),  # the paper's Table 1 with both auxiliary classifiers
    ("googlenet_naive", {}, 104_279_704),  # naive modules: the width grows with every module
])
def test_pinned_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):
        assert count_parameters(REGISTRY.backbones.build(name, **kwargs)) == expected


def test_inception_resnet_v2_paper_layout():
    with torch.device("meta"):
        assert count_parameters(inception_resnet_v2(layout="paper")) == 32_433_928
    with pytest.raises(ValueError, match="layout must be one of"):
        inception_resnet_v2(layout="tf")


def _randomise_bn_statistics(model: nn.Module) -> None:
    """Non-default running statistics, so that loading them is actually checked."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name,side", [("googlenet", 64), ("inception_v3", 96)])
def test_torchvision_checkpoint_loads_and_matches(tmp_path, name, side):
    torch.manual_seed(0)
    tv_builder = getattr(torchvision.models, name)
    tv = tv_builder(weights=None, aux_logits=True, init_weights=True, transform_input=False).eval()
    _randomise_bn_statistics(tv)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = REGISTRY.backbones.build(name).eval()
    assert ours.load_pretrained(tmp_path / "tv.pth", strict=True) == []
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))
    # torchvision's pretrained weights come with transform_input=True: ImageNet-normalised input is
    # re-normalised to [-1, 1]. detkit's variant defaults (mean = std = 0.5) give that input directly.
    tv_transform = tv_builder(weights=None, aux_logits=True, init_weights=False, transform_input=True).eval()
    tv_transform.load_state_dict(tv.state_dict())
    image = torch.rand(1, 3, side, side)
    imagenet = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    d = ours.defaults
    ours_input = (image - torch.tensor(d.mean)[:, None, None]) / torch.tensor(d.std)[:, None, None]
    with torch.no_grad():
        got, want = ours(ours_input), tv_transform(imagenet)
    # Randomly initialised deep networks amplify float rounding of the two normalisations; compare to
    # the logits' scale (a wrong normalisation changes them by about 100%).
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_imagenet_checkpoint_into_a_smaller_classifier(tmp_path):
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    few = REGISTRY.backbones.build("googlenet", num_classes=5)
    missing = few.load_pretrained(tmp_path / "tv.pth")
    # Only the 1000-way layers (main and both auxiliary classifiers) are left out.
    assert sorted(missing) == sorted(f"{m}.{p}" for m in ("fc", "aux1.fc2", "aux2.fc2") for p in ("weight", "bias"))


def test_googlenet_auxiliary_classifiers_match_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).eval()
    ours = REGISTRY.backbones.build("googlenet").eval()
    ours.load_state_dict(tv.state_dict())
    a, d = torch.randn(2, 512, 14, 14), torch.randn(2, 528, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours.aux1(a), tv.aux1(a))
        torch.testing.assert_close(ours.aux2(d), tv.aux2(d))


def test_googlenet_outputs_and_auxiliary_loss():
    torch.manual_seed(0)
    model = REGISTRY.backbones.build("googlenet", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    main, aux1, aux2 = model(x)
    assert main.shape == aux1.shape == aux2.shape == (2, 3)
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)
    # Hand-computed: CE([2, 0, 0], 0) = log(1 + 2 e^-2), CE([0, 0, 0], 0) = log 3,
    # CE([0, 1, 0], 0) = log(2 + e); total = main + 0.3 aux1 + 0.3 aux2 (Sec. 5; the notes).
    outputs = (torch.tensor([[2.0, 0, 0]]), torch.zeros(1, 3), torch.tensor([[0.0, 1, 0]]))
    expected = math.log(1 + 2 * math.exp(-2)) + 0.3 * math.log(3) + 0.3 * math.log(2 + math.e)
    assert model.classification_loss(outputs, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-6)
    assert model.classification_loss(outputs[0], torch.tensor([0])).item() == pytest.approx(
        math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    with pytest.raises(ValueError, match="expected \\(logits, aux1, aux2\\)"):
        model.classification_loss(outputs[:2], torch.tensor([0]))


def test_googlenet_without_auxiliary_classifiers():
    model = REGISTRY.backbones.build("googlenet", num_classes=3, aux_logits=False).train()
    assert model.aux1 is None and model.aux2 is None
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_inception_v3_label_smoothing_and_auxiliary_weight():
    smooth = REGISTRY.backbones.build("inception_v3", num_classes=4, aux_logits=False)
    plain = REGISTRY.backbones.build("inception_v3", num_classes=4, aux_logits=False, label_smoothing=0.0)
    assert smooth.label_smoothing == 0.1 and smooth.aux_weight == 0.4
    logits, y = torch.tensor([[8.0, 0, 0, 0]]), torch.tensor([0])
    log_z = math.log(math.exp(8) + 3)
    # Plain: -log p_0 = log Z - 8. Smoothed (Sec. 7, q' = 0.9 q + 0.1 / 4): -0.925 log p_0 - 0.075 log p_k
    # = log Z - 0.925 * 8; smoothing raises the loss of this confident correct prediction by 0.6.
    assert plain.classification_loss(logits, y).item() == pytest.approx(log_z - 8, abs=1e-6)
    assert smooth.classification_loss(logits, y).item() == pytest.approx(log_z - 7.4, abs=1e-6)
    # With the auxiliary head: + 0.4 x its smoothed loss; uniform aux logits cost log 4 whatever the smoothing.
    total = smooth.classification_loss((logits, torch.zeros(1, 4)), y).item()
    assert total == pytest.approx(log_z - 7.4 + 0.4 * math.log(4), abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        REGISTRY.backbones.build("inception_v3", label_smoothing=1.5)


def test_inception_v3_training_returns_auxiliary_logits_on_small_input():
    torch.manual_seed(0)
    model = REGISTRY.backbones.build("inception_v3", num_classes=5).train()
    main, aux = model(torch.randn(2, 3, 75, 75))  # 75: the smallest input; the aux grid is then 3x3
    assert main.shape == aux.shape == (2, 5)


def test_naive_module_has_no_reductions():
    with torch.device("meta"):
        model = REGISTRY.backbones.build("googlenet_naive", num_classes=3)
    for module in (m for m in model.modules() if isinstance(m, Inception)):
        assert isinstance(module.branch2.conv, nn.Conv2d) and module.branch2.conv.kernel_size == (3, 3)
        assert isinstance(module.branch3.conv, nn.Conv2d) and module.branch3.conv.kernel_size == (5, 5)
        assert isinstance(module.branch4, nn.MaxPool2d)  # the pooled input passes through whole
    assert model.inception3a.out_channels == 64 + 128 + 32 + 192
    assert model.inception5b.out_channels == 4944


def _multiplications(module: nn.Module, x: torch.Tensor) -> int:
    """Multiplications of the module's convolutions on x: per output value, in_channels * kh * kw."""
    total = 0

    def hook(conv, _, out):
        nonlocal total
        total += out[0].numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total


def test_bottleneck_reduces_the_5x5_cost_as_in_the_notes():
    # Notes (001): 5x5 x 32 on 28x28x192 costs 28*28*32*5*5*192 ~ 120M multiplications; a 1x1 x 16
    # bottleneck first costs 2.4M + 10M = 12.4M (inception3a's 5x5 branch, Table 1).
    x = torch.randn(1, 192, 28, 28)
    naive = Inception(192, 64, 96, 128, 16, 32, 32, bn=False, k5=5, naive=True)
    reduced = Inception(192, 64, 96, 128, 16, 32, 32, bn=False, k5=5)
    assert _multiplications(naive.branch3, x) == 28 * 28 * 32 * 5 * 5 * 192 == 120_422_400
    assert _multiplications(reduced.branch3, x) == 28 * 28 * 16 * 192 + 28 * 28 * 32 * 5 * 5 * 16 == 12_443_648
    assert naive(x).shape == (1, 64 + 128 + 32 + 192, 28, 28)
    assert reduced(x).shape == (1, 256, 28, 28)
