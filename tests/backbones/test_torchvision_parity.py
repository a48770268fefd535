"""Parameter counts and checkpoints against torchvision, the independent reference."""
import pytest
import torch
import torchvision

from registry_utils import shared_registries

REGISTRY = shared_registries()  # names to parametrise over, at collection
SAME_AS_TORCHVISION = [n for n in (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn",
    "vgg13_bn", "vgg16_bn", "vgg19_bn", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "densenet121", "densenet169", "densenet201", "densenet161",
    "squeezenet1_0", "squeezenet1_1", "googlenet", "inception_v3") if n in REGISTRY.backbones]


def count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", SAME_AS_TORCHVISION)
def test_parameter_count_equals_torchvision(name):
    with torch.device("meta"):
        ours = REGISTRY.backbones.build(name, num_classes=1000)
        theirs = torchvision.models.get_model(name, weights=None)
    assert count(ours) == count(theirs)


def test_documented_counts():
    assert count(REGISTRY.backbones.build("resnet50")) == 25_557_032
    assert count(REGISTRY.backbones.build("vgg16")) == 138_357_544


@pytest.mark.parametrize("name,kwargs", [("resnet50", {"stride_in_1x1": False}),
                                         pytest.param("vgg16", {}, marks=pytest.mark.slow)])
def test_torchvision_checkpoint_loads_and_matches(name, kwargs, tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.get_model(name, weights=None).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    ours = REGISTRY.backbones.build(name, **kwargs).eval()
    missing = ours.load_pretrained(path)
    assert missing == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))
    # A 1000-class checkpoint into a detector-sized classifier: the classifier is skipped, the rest loads.
    few = REGISTRY.backbones.build(name, num_classes=5, **kwargs)
    missing = few.load_pretrained(path)
    assert missing and all(m.startswith(("fc.", "classifier.6")) for m in missing)


def test_bad_weights_file_is_reported(tmp_path):
    model = REGISTRY.backbones.build("resnet18")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        model.load_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.load_pretrained(tmp_path / "nope.pth")
