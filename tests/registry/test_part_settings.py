"""A third-party part with its own config keys, written from the docs alone: the RoI extractor of the
plugins page's "Parts own their settings" paragraph (docs/plugins.md) is installed as a package with an entry
point, configured, validated (a misspelt key gets a suggestion), shown resolved by ``detkit config show``,
trained through the CLI and rebuilt from its checkpoint."""
import os
import re

import pytest
import torch
import yaml

from detkit.cli import main
from detkit.engine.checkpoint import load_checkpoint
from detkit.models.loading import model_from_checkpoint
from detkit.plugins import get_plugin_manager, get_registries
from test_plugins import _write_dist

PLUGINS_PAGE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "plugins.md")


def documented_plugin() -> str:
    text = open(PLUGINS_PAGE, encoding="utf-8").read()
    match = re.search(r"```python\n(# detkit_mixpool/__init__.py\n.*?)```", text, re.S)
    assert match, "docs/plugins.md: the mix_pool plugin example is missing"
    return match.group(1)


@pytest.fixture
def mixpool(tmp_path, monkeypatch):
    _write_dist(tmp_path, "detkit_mixpool", "mixpool", "detkit_mixpool", documented_plugin())
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_config(tmp_path, extractor: dict):
    data = tmp_path / "data"
    if not (data / "annotations.json").exists():
        assert main(["data", "synth", "--output", str(data), "--format", "coco", "--num-images", "6", "--seed", "0",
                     "--size", "96x128"]) == 0
    cfg = {
        "model": {
            "backbone": {"name": "tiny", "args": {"widths": [8, 8, 16, 16, 16], "hidden": 16}},
            "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64]}, "pre_nms_top_n_train": 200,
                                   "post_nms_top_n_train": 40, "pre_nms_top_n_test": 100,
                                   "post_nms_top_n_test": 20, "min_size": 2},
            "roi_extractor": extractor,
            "roi_heads": {"batch_size_per_image": 16},
            "transform": {"min_size": 96, "max_size": 128},
        },
        "data": {"train": {"name": "coco", "images": str(data / "images"),
                           "annotations": str(data / "annotations.json")},
                 "test": {"name": "coco", "images": str(data / "images"),
                          "annotations": str(data / "annotations.json")},
                 "batch_size": 2, "num_workers": 0},
        "train": {"work_dir": str(tmp_path / "run"), "max_iters": 3, "lr": 0.01, "steps": [2],
                  "checkpoint_period": 3, "log_period": 1, "eval_at_end": False},
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_readme_extractor_is_configured_validated_shown_and_trained(mixpool, tmp_path, capsys):
    reg = get_registries(get_plugin_manager())
    entry = reg.roi_extractors.get("mix_pool")
    assert entry.plugin == "mixpool" and entry.settings.__name__ == "MixPoolSettings"
    path = write_config(tmp_path, {"name": "mix_pool", "mix": 0.25})
    capsys.readouterr()

    assert main(["list", "roi_extractors"]) == 0
    assert re.search(r"mix_pool +plugin=mixpool +keys=\[output_size, mix\]", capsys.readouterr().out)
    assert main(["config", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["model"]
    assert shown["roi_extractor"] == {"name": "mix_pool", "output_size": None, "mix": 0.25}
    assert shown["proposal_generator"]["anchors"]["sizes"] == [16.0, 32.0, 64.0]  # resolved, every key

    assert main(["train", str(path), "--set", "model.roi_extractor.mixx=0.3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.roi_extractor.mixx'; did you mean 'model.roi_extractor.mix'?" in err
    assert "--set model.roi_extractor.mixx=0.3:" in err and str(path) not in err  # the override is to blame
    assert main(["train", str(path), "--set", "model.roi_extractor.mix=lots", "--no-progress"]) == 2
    assert "model.roi_extractor.mix: expected a number" in capsys.readouterr().err

    assert main(["train", str(path), "--no-progress"]) == 0
    final = tmp_path / "run" / "final.pth"
    assert load_checkpoint(str(final))["config"]["model"]["roi_extractor"] == {"name": "mix_pool",
                                                                             "output_size": None, "mix": 0.25}
    model, cfg, _ = model_from_checkpoint(str(final), reg, torch.device("cpu"))
    extractor = model.roi_heads.roi_extractor
    assert type(extractor).__name__ == "MixPool" and extractor.mix == 0.25
    tiny = reg.backbones.get("tiny").builder(**cfg.model.backbone.args)
    assert extractor.output_size == (tiny.defaults.roi_output_size,) * 2  # output_size null: the backbone's
    features = torch.rand(1, 16, 6, 8)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 48.0]])]
    pooled = extractor(features, boxes)
    assert pooled.shape == (1, 16, *extractor.output_size)
    # the mixture of the two kernels the plugins page names, with the configured weight
    from torchvision.ops import roi_align, roi_pool

    expected = 0.25 * roi_pool(features, boxes, extractor.output_size, 1 / 16) + \
        0.75 * roi_align(features, boxes, extractor.output_size, 1 / 16, 2, True)
    torch.testing.assert_close(pooled, expected)


def test_readme_extractor_pools_from_a_feature_pyramid(mixpool):
    """The plugins page's extractor derives from LevelPooling, so it takes an FPN neck too."""
    from detkit.config import from_dict
    from detkit.models.assembly import build_detector

    reg = get_registries(get_plugin_manager())
    cfg = from_dict({"model": {
        "backbone": {"name": "tiny", "args": {"widths": [8, 8, 16, 16, 16], "hidden": 16}},
        "neck": {"name": "fpn", "in_strides": [4, 8, 16], "out_channels": 8},
        "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128]}, "min_size": 1},
        "roi_extractor": {"name": "mix_pool", "mix": 0.25}, "box_head": {"name": "two_fc", "fc_dim": 16},
        "transform": {"min_size": 64, "max_size": 96}}}).model
    model = build_detector(cfg, reg, 2, ["a", "b"]).train()
    assert model.roi_heads.roi_extractor.strides == [4, 8, 16]
    losses = model([torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)],
                   [{"boxes": torch.tensor([[4.0, 4, 40, 30]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
