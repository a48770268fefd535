"""Weights layouts: pretrained weights whose names and shapes fit but whose function depends on how the model
is configured (a ResNet bottleneck's stride on the first 1x1, the paper's, or on the 3x3, torchvision's
"ResNet v1.5") are checked against the configured layout: the layout recorded in detkit's ``backbone.pth``,
declared by ``model.backbone.weights_layout``, or torchvision's for a file without a record; a mismatch is
refused with the ``model.backbone.args`` key to set, in the library and from ``detkit train`` (exit 2).
"""
import logging
import types

import pytest
import torch
import torchvision
import yaml

from detkit.classification.model import build_classifier
from detkit.classification.trainer import ClassifierTrainer
from detkit.cli import main
from detkit.config import ClassifierModelConfig, ConfigError, ModelConfig, from_dict
from detkit.engine.state_dict import WeightsError, read_state_dict, recorded_weights_layout
from detkit.models.assembly import build_backbone
from detkit_resnet.resnet import BasicBlock, Bottleneck, ResNet
from e2e_utils import SIZE, write_config

V15_REFUSED = ("the file records no weights layout, so it is taken for torchvision's: its weights were trained "
               "with stride_in_1x1=False (the stride on the 3x3 convolution); the model is configured with "
               "stride_in_1x1=True: set model.backbone.args.stride_in_1x1: false")


def small_resnet(stride_in_1x1: bool = True, block=Bottleneck) -> ResNet:
    """A bottleneck ResNet of one block per stage and narrow widths: the names of resnet50, a fraction of it."""
    return ResNet(block, [1, 1, 1, 1], num_classes=10, stride_in_1x1=stride_in_1x1, widths=(8, 16, 32, 64))


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """torchvision's resnet50 and resnet18 state dicts (random weights: the names are what matter)."""
    root = tmp_path_factory.mktemp("torchvision")
    torch.manual_seed(0)
    for name in ("resnet50", "resnet18"):
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), root / f"{name}.pth")
    return root


def test_a_torchvision_resnet50_file_loads_into_the_v15_layout_only(registries, torchvision_files, caplog):
    path = torchvision_files / "resnet50.pth"
    caplog.set_level(logging.INFO, logger="detkit.backbones")
    assert registries.backbones.build("resnet50", stride_in_1x1=False).load_pretrained(path) == []
    assert ("weights layout stride_in_1x1=False (the stride on the 3x3 convolution): torchvision's, assumed for "
            "a file without a record") in caplog.text
    paper = registries.backbones.build("resnet50")  # detkit's default: the paper's layout
    with pytest.raises(WeightsError) as refused:
        paper.load_pretrained(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: {V15_REFUSED}")
    assert "model.backbone.weights_layout: {stride_in_1x1: true}" in message


def test_weights_layout_declares_the_layout_of_a_file_trained_elsewhere(registries, torchvision_files, caplog):
    path = torchvision_files / "resnet50.pth"
    caplog.set_level(logging.INFO, logger="detkit.backbones")
    cfg = ModelConfig()
    cfg.backbone.name, cfg.backbone.weights = "resnet50", str(path)
    cfg.backbone.weights_layout = {"stride_in_1x1": True}  # "trained in the paper's layout"
    paper = build_backbone(cfg, registries)
    assert "weights layout stride_in_1x1=True (the stride on the first 1x1 convolution): " \
           "model.backbone.weights_layout" in caplog.text
    assert torch.equal(paper.layer4[2].conv3.weight, torch.load(path, weights_only=True)["layer4.2.conv3.weight"])
    cfg.backbone.args = {"stride_in_1x1": False}
    with pytest.raises(WeightsError, match="model.backbone.weights_layout says its weights were trained with "
                                           r"stride_in_1x1=True .*set model.backbone.args.stride_in_1x1: true"):
        build_backbone(cfg, registries)


@pytest.mark.parametrize("layout,error", [
    ({"stride_in1x1": True}, "model.backbone.weights_layout.stride_in1x1: not part of the weights layout of "
                             "backbone 'resnet50'; did you mean 'model.backbone.weights_layout.stride_in_1x1'?"),
    ({"stride_in_1x1": "yes"}, "model.backbone.weights_layout.stride_in_1x1='yes': expected a bool"),
])
def test_a_wrong_weights_layout_names_the_key(registries, torchvision_files, layout, error):
    cfg = from_dict({"model": {"backbone": {"name": "resnet50", "weights": str(torchvision_files / "resnet50.pth"),
                                            "weights_layout": layout}}}).model
    with pytest.raises(ConfigError) as refused:
        build_backbone(cfg, registries)
    assert str(refused.value).startswith(error)


def test_basic_block_networks_have_no_layout(registries, torchvision_files):
    path = torchvision_files / "resnet18.pth"
    for stride_in_1x1 in (True, False):  # the stride of a basic unit has one place: nothing to tell apart
        model = registries.backbones.build("resnet18", stride_in_1x1=stride_in_1x1)
        assert model.weights_layout() == {} and model.load_pretrained(path) == []
        assert recorded_weights_layout(model.weights_state_dict()) is None
    cfg = ModelConfig()
    cfg.backbone.name, cfg.backbone.weights = "resnet18", str(path)
    cfg.backbone.weights_layout = {"stride_in_1x1": True}
    with pytest.raises(ConfigError, match="model.backbone.weights_layout: backbone 'resnet18' declares no weights "
                                          "layout"):
        build_backbone(cfg, registries)


def write_backbone_pth(backbone, work_dir) -> str:
    """``backbone.pth`` written by pretraining's own writer (ClassifierTrainer.write_outputs)."""
    train = types.SimpleNamespace(work_dir=str(work_dir), eval_at_end=False)
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(train=train), model=types.SimpleNamespace(
        backbone=backbone))
    ClassifierTrainer.write_outputs(trainer)
    return str(work_dir / "backbone.pth")


def test_detkit_records_the_layout_and_refuses_the_other(tmp_path, caplog):
    path = write_backbone_pth(small_resnet(stride_in_1x1=True), tmp_path)
    caplog.set_level(logging.INFO, logger="detkit.backbones")
    assert small_resnet(stride_in_1x1=True).load_pretrained(path) == []
    assert "stride_in_1x1=True (the stride on the first 1x1 convolution): recorded in the file" in caplog.text
    with pytest.raises(WeightsError) as refused:
        small_resnet(stride_in_1x1=False).load_pretrained(path)
    assert str(refused.value) == (f"{path}: its weights were trained with stride_in_1x1=True (the stride on the "
                                  f"first 1x1 convolution); the model is configured with stride_in_1x1=False: set "
                                  f"model.backbone.args.stride_in_1x1: true")
    # A record is the file's own word: a declaration against it is refused, not obeyed.
    with pytest.raises(WeightsError, match="records that its weights were trained with stride_in_1x1=True .*, not "
                                           "stride_in_1x1=False as model.backbone.weights_layout says"):
        small_resnet(stride_in_1x1=False).load_pretrained(path, declared_layout={"stride_in_1x1": False})


def test_the_record_leaves_the_file_a_plain_state_dict(registries, tmp_path):
    ours = registries.backbones.build("resnet50", stride_in_1x1=False)
    path = write_backbone_pth(ours, tmp_path)
    raw = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())  # no entry beside the tensors
    assert recorded_weights_layout(raw) == {"stride_in_1x1": False}
    state = read_state_dict(path, "pretrained weights file")
    assert recorded_weights_layout(state) == {"stride_in_1x1": False} and state.keys() == ours.state_dict().keys()
    torchvision.models.resnet50().load_state_dict(raw)  # strict: torchvision's own model takes it as it is


def test_pretraining_configs_take_the_same_keys(registries, torchvision_files):
    weights = str(torchvision_files / "resnet50.pth")
    cfg = ClassifierModelConfig()
    cfg.backbone.name, cfg.backbone.weights = "resnet50", weights
    with pytest.raises(ConfigError, match=f"model.backbone.weights: {weights}: the file records no weights layout"
                                          r".*set model.backbone.args.stride_in_1x1: false"):
        build_classifier(cfg, registries, 4)
    cfg.backbone.weights_layout = {"stride_in_1x1": True}
    assert build_classifier(cfg, registries, 4).backbone.weights_layout() == {"stride_in_1x1": True}


def test_train_refuses_a_torchvision_file_for_the_paper_layout_before_training(torchvision_files, tmp_path, capsys):
    data = tmp_path / "data"
    for split, n in (("train", 2), ("val", 1)):
        assert main(["data", "synth", "--output", str(data / split), "--format", "coco", "--num-images", str(n),
                     "--size", SIZE]) == 0
    cfg_path = write_config(tmp_path / "c.yaml", data, tmp_path / "run")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["backbone"] = {"name": "resnet50", "weights": str(torchvision_files / "resnet50.pth")}
    cfg_path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(cfg_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"model.backbone.weights: {torchvision_files / 'resnet50.pth'}: {V15_REFUSED}" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "run").glob("*.pth")) and not (tmp_path / "run" / "log.jsonl").exists()
