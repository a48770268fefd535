"""Plugin discovery: entry points, duplicates, broken plugins, hook validation, out-of-tree packages."""
import sys
import textwrap
import types

import pytest

from detkit.hookspecs import hookimpl
from detkit.plugins import PluginWarning, get_plugin_manager, get_registries


def test_builtins_load_through_entry_points():
    reg = get_registries()
    assert reg.backbones.get("tiny").plugin == "tiny"
    assert reg.detectors.get("faster_rcnn").plugin == "core"
    assert {"rpn"} <= set(reg.proposal_generators)
    assert {"roi_pool", "roi_align"} <= set(reg.roi_extractors)
    assert {"coco", "voc"} <= set(reg.datasets)


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("DETKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = get_registries(get_plugin_manager())
    assert len(reg.backbones) == 0 and len(reg.detectors) == 0
    monkeypatch.setenv("DETKIT_PLUGINS", "detkit_tiny")
    assert "tiny" in get_registries(get_plugin_manager()).backbones


def test_duplicate_name_names_both_plugins_and_skips_the_third_party_one():
    dup = types.ModuleType("dup_plugin")

    @hookimpl
    def detkit_register_backbones(register):
        register("tiny", lambda num_classes=1000: None)

    dup.detkit_register_backbones = detkit_register_backbones
    with pytest.warns(PluginWarning, match=r"'dup_plugin' failed.*backbone 'tiny', which built-in plugin 'tiny'"):
        reg = get_registries(get_plugin_manager(plugins=[dup]))
    assert reg.backbones.get("tiny").plugin == "tiny"


def test_hook_matching_no_spec_is_rejected():
    typo = types.ModuleType("typo_plugin")

    @hookimpl
    def detkit_register_backbone(register):  # missing "s"
        pass

    typo.detkit_register_backbone = detkit_register_backbone
    with pytest.warns(PluginWarning, match="'typo_plugin' failed.*hook detkit_register_backbone matches no hook"):
        pm = get_plugin_manager(plugins=[typo])
    assert pm.detkit_plugins["typo_plugin"].status == "failed"


def test_unknown_name_suggests_closest(registries):
    with pytest.raises(KeyError, match="did you mean 'tiny'"):
        registries.backbones.get("tinny")


def _write_dist(tmp_path, dist_name, ep_name, module, source):
    """A minimal installed distribution (dist-info with an entry point) on a temporary sys.path entry."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{dist_name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[detkit]\n{ep_name} = {module}\n")


def test_broken_plugin_is_reported_and_others_survive(tmp_path, monkeypatch):
    _write_dist(tmp_path, "broken_plugin", "broken", "detkit_broken_mod", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="'broken' failed to load.*needs libfoo"):
        reg = get_registries(get_plugin_manager())
    assert reg.load_errors["broken"].startswith("ImportError")
    assert "tiny" in reg.backbones


OUT_OF_TREE = '''
"""A third-party backbone plugin, written the way docs/plugins.md describes."""
from torch import nn
from detkit.backbones import Backbone, BackboneDefaults, DetectionParts
from detkit.hookspecs import hookimpl


class PicoNet(Backbone):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 64, 64), roi_output_size=5)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 25, 64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(5)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.pool(self.features(x))))

    def detection_parts(self):
        return DetectionParts(trunk=self.features, roi_head=self.head, out_channels=24, stride=16,
                              head_channels=64, stages=[self.features])


@hookimpl
def detkit_register_backbones(register):
    register("piconet", PicoNet, family="pico")
'''


def test_out_of_tree_plugin_is_discovered_and_trains(tmp_path, monkeypatch):
    import torch

    from detkit.config import ModelConfig, PartConfig
    from detkit.models.assembly import build_detector

    _write_dist(tmp_path, "detkit_pico", "pico", "detkit_pico", OUT_OF_TREE)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = get_registries(get_plugin_manager())
    entry = reg.backbones.get("piconet")
    assert entry.plugin == "pico"

    cfg = ModelConfig()
    cfg.backbone.name = "piconet"
    cfg.transform.min_size, cfg.transform.max_size = 96, 128
    cfg.proposal_generator = PartConfig("rpn", {"anchors": {"sizes": [16.0, 32.0]}, "min_size": 1})
    model = build_detector(cfg, reg, num_classes=2)
    params = [p for p in model.trunk.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([2])}
    model.train()
    for _ in range(3):
        losses = model([image], [target])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert set(losses) == {"rpn/objectness", "rpn/box_reg", "roi/cls", "roi/box_reg"}
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
