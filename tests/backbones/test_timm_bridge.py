"""The timm bridge, against a stand-in ``timm`` package written to a temporary directory.

timm is not installed here. The stand-in implements the part of timm's API the bridge uses, with timm's
signatures and behaviour (checked against timm's source): ``list_models``, ``create_model(model_name,
pretrained, pretrained_cfg_overlay=dict(file=...), num_classes, ...)``, models with ``feature_info`` (a list
of ``{"num_chs", "reduction", "module"}`` dicts on classification models, a ``FeatureInfo`` with
``channels()``, ``reduction()``, ``module_name()`` on features-only ones: both forms are exercised),
``forward_features``, ``forward_head(x, pre_logits)``, ``forward_intermediates(x, indices, ...,
stop_early, intermediates_only)`` and ``pretrained_cfg``.
"""
import sys
import textwrap
import warnings

import pytest
import torch

import detkit_timm
from detkit.plugins import get_plugin_manager, get_registries
from test_backbones import check_backbone_contract

FAKE_TIMM = '''
"""Stand-in for timm (test double): two tiny models, one per detection case of the bridge."""
import torch
from torch import nn

CREATED = []  # (model_name, kwargs) of every create_model call


class FeatureInfo:
    """timm.models._features.FeatureInfo: per-feature dicts, accessors over out_indices or given indices."""

    def __init__(self, feature_info, out_indices):
        self.info, self.out_indices = feature_info, tuple(out_indices)

    def get(self, key, idx=None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self):
        return len(self.info)


def conv_bn_act(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SelectAdaptivePool2d(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


class FakeResNet(nn.Module):
    """timm's ResNet layout: conv1, bn1, act1, maxpool, layer1..layer4, global_pool, fc."""

    def __init__(self, num_classes=1000, widths=(8, 12, 16, 24)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 8
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(conv_bn_act(cin, w, 1 if i == 0 else 2), conv_bn_act(w, w, 1)))
            cin = w
        self.global_pool = SelectAdaptivePool2d()
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        info = [dict(num_chs=8, reduction=2, module="act1")]
        info += [dict(num_chs=w, reduction=4 * 2 ** i, module=f"layer{i + 1}") for i, w in enumerate(widths)]
        self.feature_info = FeatureInfo(info, range(len(info)))
        self.pretrained_cfg = dict(input_size=(3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def forward_features(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x, pre_logits=False):
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        stages = [lambda z: self.act1(self.bn1(self.conv1(z))),
                  lambda z: self.layer1(self.maxpool(z)), self.layer2, self.layer3, self.layer4]
        out = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in indices:
                out.append(x)
            if stop_early and i >= max(indices):
                break
        return out if intermediates_only else (x, out)


class FakeViT(nn.Module):
    """A stride-16 patch embedding plus a position embedding added in forward_features (not a module):
    its children are not its forward order."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 16, 16)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, 1, 1))
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU()))
        self.stage2 = conv_bn_act(16, 24, 2)
        self.head = nn.Linear(24, num_classes)
        self.feature_info = [dict(num_chs=16, reduction=16, module="blocks.0"),
                             dict(num_chs=16, reduction=16, module="blocks.1"),
                             dict(num_chs=24, reduction=32, module="stage2")]
        self.pretrained_cfg = dict(input_size=(3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def _stages(self):
        return [lambda z: self.blocks[0](self.patch_embed(z) + self.pos_embed), self.blocks[1], self.stage2]

    def forward_features(self, x):
        for stage in self._stages():
            x = stage(x)
        return x

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        out = []
        for i, stage in enumerate(self._stages()):
            x = stage(x)
            if i in indices:
                out.append(x)
            if stop_early and i >= max(indices):
                break
        return out if intermediates_only else (x, out)


_MODELS = {"fake_resnet": FakeResNet, "fake_vit": FakeViT}


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    return sorted(_MODELS)


def create_model(model_name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                 checkpoint_path=None, **kwargs):
    CREATED.append((model_name, dict(kwargs, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay)))
    num_classes = kwargs.pop("num_classes", 1000)
    model = _MODELS[model_name](num_classes=num_classes, **kwargs)
    if pretrained:
        file = (pretrained_cfg_overlay or {}).get("file")
        if not file:
            raise RuntimeError("the stand-in timm never downloads: pretrained=True needs a local file")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if num_classes != 1000:  # as timm: a classifier of another size is left at its initialisation
            state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
        model.load_state_dict(state, strict=num_classes == 1000)
    return model
'''


@pytest.fixture
def fake_timm(tmp_path, monkeypatch):
    package = tmp_path / "timm"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_TIMM))
    monkeypatch.syspath_prepend(str(tmp_path))
    # setitem records whether timm was imported before, so teardown removes the stand-in from sys.modules
    monkeypatch.setitem(sys.modules, "timm", None)
    del sys.modules["timm"]
    import timm

    assert timm.__file__.startswith(str(tmp_path))
    return timm


def timm_registries():
    return get_registries(get_plugin_manager(autoload=False, plugins=[detkit_timm]))


def test_registers_every_model_lazily(fake_timm):
    reg = timm_registries()
    names = [e.name for e in reg.backbones.entries() if e.plugin == "detkit_timm"]
    assert names == ["timm/fake_resnet", "timm/fake_vit"]
    assert fake_timm.CREATED == []  # nothing is built at registration
    model = reg.backbones.build("timm/fake_resnet", num_classes=5)
    assert fake_timm.CREATED == [("fake_resnet", dict(num_classes=5, pretrained=False, pretrained_cfg_overlay=None))]
    assert model.defaults.input_size == (3, 64, 64) and model.defaults.std == (0.25, 0.25, 0.25)


def _check_contract(model, side=64):
    """The backbone contract (test_backbones.py), with the trunk's map exactly side / stride."""
    parts, feats = check_backbone_contract(model, torch.randn(2, 3, side, side), num_classes=5)
    assert feats.shape[-1] == side // parts.stride
    return parts


def test_sequential_model_is_cut_at_stride_16_and_keeps_the_rest_as_box_head(fake_timm):
    torch.manual_seed(0)
    model = timm_registries().backbones.build("timm/fake_resnet", num_classes=5)
    assert model.sequential
    parts = _check_contract(model)
    assert (parts.out_channels, parts.stride, parts.head_channels) == (16, 16, 24)
    assert model.defaults.roi_output_size == 14  # layer4 halves 14x14 RoIs to 7x7
    # stages: stem (conv1..act1), then maxpool + layer1, layer2, layer3 (cut at feature_info's layer3)
    assert len(parts.stages) == 4 and parts.stages[-1][-1] is model.model.layer3
    assert all(any(p is q for q in parts.trunk.parameters()) for st in parts.stages for p in st.parameters())
    # box_head is the rest of the timm network: on the whole trunk map it gives the model's pre-logits
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        timm_feature = model.model.forward_intermediates(x, [3], intermediates_only=True)[0]
        torch.testing.assert_close(parts.trunk(x), timm_feature)
        expected = model.model.forward_head(model.model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(parts.box_head(parts.trunk(x)), expected)
    assert {id(p) for p in parts.box_head.parameters()} == \
        {id(p) for m in (model.model.layer4, model.model.fc) for p in m.parameters()}
    assert not any(k.startswith("prelogits") for k in model.state_dict())  # no duplicate keys


def test_non_sequential_model_gets_the_documented_fallback(fake_timm):
    torch.manual_seed(0)
    model = timm_registries().backbones.build("timm/fake_vit", num_classes=5)
    # children resolve by name but the forward adds pos_embed between them: the check must reject the chain
    assert not model.sequential
    parts = _check_contract(model)
    assert (parts.out_channels, parts.stride, parts.head_channels, parts.stages) == (16, 16, 16, [])
    assert model.defaults.roi_output_size == 7
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():  # the trunk is timm's own intermediate feature (feature_info index 1, blocks.1)
        timm_feature = model.model.forward_intermediates(x, [1], intermediates_only=True)[0]
        torch.testing.assert_close(parts.trunk(x), timm_feature)
    assert parts.box_head is model.roi_fallback and isinstance(parts.box_head[0], torch.nn.Conv2d)


def test_pretrained_weights_only_from_a_local_file(fake_timm, tmp_path):
    torch.manual_seed(0)
    source = fake_timm.create_model("fake_resnet")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    reg = timm_registries()
    model = reg.backbones.build("timm/fake_resnet", num_classes=1000, pretrained_file=str(tmp_path / "w.pth"))
    assert fake_timm.CREATED[-1][1]["pretrained_cfg_overlay"] == {"file": str(tmp_path / "w.pth")}
    torch.testing.assert_close(model.model.layer3[0][0].weight, source.layer3[0][0].weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        reg.backbones.build("timm/fake_resnet", pretrained_file=str(tmp_path / "nope.pth"))
    # detkit's own loader takes a plain timm state dict (keys without the "model." prefix)
    other = reg.backbones.build("timm/fake_resnet", num_classes=3)
    assert other.load_pretrained(tmp_path / "w.pth") == ["model.fc.weight", "model.fc.bias"]
    torch.testing.assert_close(other.model.conv1.weight, source.conv1.weight)


def test_feature_info_of_both_forms_and_bad_ones():
    from torch import nn

    class Model(nn.Module):
        feature_info = [dict(num_chs=4, reduction=8, module="a"), dict(num_chs=6, reduction=32, module="b")]

    assert detkit_timm.cut_index(detkit_timm.feature_infos(Model(), "m"), "m") == 0  # no stride 16: deepest <= 16
    Model.feature_info = [dict(num_chs=4, module="a")]
    with pytest.raises(ValueError, match=r"timm/m: feature_info\[0\] lacks \['reduction'\]"):
        detkit_timm.feature_infos(Model(), "m")
    Model.feature_info = [dict(num_chs=4, reduction=32, module="a")]
    with pytest.raises(ValueError, match="no feature map of stride <= 16"):
        detkit_timm.cut_index(detkit_timm.feature_infos(Model(), "m"), "m")


def test_without_timm_the_hook_registers_nothing_silently(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = timm_registries()
    assert not [n for n in reg.backbones if n.startswith("timm/")]
    assert reg.load_errors == {}


def test_timm_is_not_installed_here():
    # the bridge's behaviour in this environment (timm is optional and absent): nothing registered
    try:
        import timm  # noqa: F401
    except ImportError:
        assert not [n for n in timm_registries().backbones if n.startswith("timm/")]
    else:
        pytest.skip("timm is installed; the stand-in tests cover the bridge")
