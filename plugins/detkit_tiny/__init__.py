"""A small, fast backbone for tests, the demo and CPU experiments.

Not from a paper: five 3x3 conv stages (16-32-64-128-128 channels, batch norm,
ReLU) reaching stride 16 with 128 channels, and a RoI head of two small fully
connected layers (VGG's fc6/fc7 shape, 256 wide), on 7x7 pooled features.
"""
from __future__ import annotations

from torch import Tensor, nn

from detkit.backbones import (Backbone, BackboneDefaults, DetectionParts, FeatureInfo, FeatureStages, Variant,
                              register_variants)
from detkit.hookspecs import hookimpl


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyNet(Backbone):
    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = (16, 32, 64, 128, 128),
                 hidden: int = 256):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"tiny: widths must have 5 entries (one per stage), got {list(widths)}")
        w = tuple(widths)  # a config gives a list
        # Stage strides 2, 2, 2, 2, 1: stride 16 at the last stage.
        self.stem = _conv_bn(3, w[0], 2)
        self.stage2 = _conv_bn(w[0], w[1], 2)
        self.stage3 = nn.Sequential(_conv_bn(w[1], w[2], 2), _conv_bn(w[2], w[2]))
        self.stage4 = nn.Sequential(_conv_bn(w[2], w[3], 2), _conv_bn(w[3], w[3]))
        self.stage5 = _conv_bn(w[3], w[4])
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(w[4] * 49, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        self.out_channels = w[4]
        self.widths = w
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage5(self.stage4(self.stage3(self.stage2(self.stem(x)))))
        return self.classifier(self.fc(self.avgpool(x)))

    def detection_parts(self) -> DetectionParts:
        stages = [self.stem, self.stage2, self.stage3, self.stage4, self.stage5]
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=self.fc, out_channels=self.out_channels,
                              stride=16, head_channels=self.hidden, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """Every stage's output (strides 2, 4, 8, 16, 16): FPN reads strides 4-16 of it."""
        stages = [self.stem, self.stage2, self.stage3, self.stage4, self.stage5]
        names, strides = ["stem", "stage2", "stage3", "stage4", "stage5"], [2, 4, 8, 16, 16]
        return FeatureStages(stages, [FeatureInfo(n, c, s) for n, c, s in zip(names, self.widths, strides)])


VARIANTS: list[Variant] = [
    Variant("tiny", TinyNet, "detkit (test/demo backbone)", BackboneDefaults(input_size=(3, 64, 64), roi_output_size=7),
            options=dict(num_classes=1000, widths=(16, 32, 64, 128, 128), hidden=256)),
]


@hookimpl
def detkit_register_backbones(register):
    register_variants(register, VARIANTS, family="tiny")
