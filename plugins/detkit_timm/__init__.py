"""detkit backbone plugin: every timm model as a backbone, when timm is installed.

timm is not a dependency. When it is importable, each name of ``timm.list_models()`` is registered as
``timm/<name>`` (nothing is built until a config asks for it). The classification model is
``timm.create_model(name, num_classes=...)``; weights come only from a local file
(``model.backbone.weights``, loaded with detkit's torchvision-format loader, or ``pretrained_file`` handed
to timm). For detection, the trunk runs the model up to its deepest feature map of stride <= 16 (timm's
``feature_info`` and ``forward_intermediates``, sharing the model's parameters); timm has no generic
"rest of the network" module, so the RoI head is a light head on the pooled features: a 3x3 convolution,
global average pooling and a 1024-wide fully connected layer (as Fast R-CNN's fc on pooled features).
"""
from __future__ import annotations

from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts
from detkit.hookspecs import hookimpl


class TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True,
                                                stop_early=True)[0]


class TimmBackbone(Backbone):
    def __init__(self, model: nn.Module, name: str, head_channels: int = 1024):
        super().__init__()
        self.model = model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))
        self.defaults = BackboneDefaults(input_size=size, mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                         std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), roi_output_size=7,
                                         min_input_size=32)
        info = list(model.feature_info)
        usable = [i for i, f in enumerate(info) if f["reduction"] <= 16]
        if not usable:
            raise ValueError(f"timm/{name}: no feature map with stride <= 16 in its feature_info")
        self.index = usable[-1]
        self.channels = int(info[self.index]["num_chs"])
        self.stride = int(info[self.index]["reduction"])
        self.roi_head_module = nn.Sequential(
            nn.Conv2d(self.channels, self.channels, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1), nn.Linear(self.channels, head_channels), nn.ReLU(inplace=True))
        self.head_channels = head_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def remap_state_dict(self, state: dict) -> dict:
        # A plain timm checkpoint names the model's own parameters; here they live under "model.".
        return {k if k.startswith(("model.", "roi_head_module.")) else f"model.{k}": v for k, v in state.items()}

    def detection_parts(self) -> DetectionParts:
        return DetectionParts(trunk=TimmTrunk(self.model, self.index), roi_head=self.roi_head_module,
                              out_channels=self.channels, stride=self.stride, head_channels=self.head_channels,
                              stages=[])


def _builder(timm, name: str):
    def build(num_classes: int = 1000, pretrained_file: str | None = None) -> TimmBackbone:
        kwargs = {"num_classes": num_classes}
        if pretrained_file:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": pretrained_file})
        return TimmBackbone(timm.create_model(name, **kwargs), name)

    return build


@hookimpl
def detkit_register_backbones(register):
    try:
        import timm
    except ImportError:
        return  # timm is optional: without it this plugin provides nothing
    for name in timm.list_models():
        register(f"timm/{name}", _builder(timm, name), family="timm", paper="timm")
