# detkit-mobilenet/detkit_mobilenet/__init__.py
"""MobileNet v1 (Howard et al. 2017) as a detkit backbone, cut for detection after conv4 (stride 16) with
conv5 as the RoI head, as ResNet-C4 is (Huang et al. 2017 cut MobileNet the same way)."""
from torch import nn

from detkit.backbones import (IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneDefaults, DetectionParts, FeatureInfo,
                              FeatureStages)
from detkit.hookspecs import hookimpl


def conv_bn(cin, cout, stride, groups=1, kernel=3):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable(cin, cout, stride):  # 3x3 depthwise, then 1x1 pointwise
    return nn.Sequential(conv_bn(cin, cin, stride, groups=cin), conv_bn(cin, cout, 1, kernel=1))


class MobileNetV1(Backbone):
    # ImageNet statistics, 224x224 input; 14x14 RoIs, which conv5 (stride 2) turns into 7x7
    defaults = BackboneDefaults(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, roi_output_size=14)

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        c = [max(8, int(n * width)) for n in (32, 64, 128, 256, 512, 1024)]
        self.features = nn.Sequential(
            nn.Sequential(conv_bn(3, c[0], 2), separable(c[0], c[1], 1)),                         # conv1: /2
            nn.Sequential(separable(c[1], c[2], 2), separable(c[2], c[2], 1)),                    # conv2: /4
            nn.Sequential(separable(c[2], c[3], 2), separable(c[3], c[3], 1)),                    # conv3: /8
            nn.Sequential(separable(c[3], c[4], 2), *[separable(c[4], c[4], 1) for _ in range(5)]),  # /16
            nn.Sequential(separable(c[4], c[5], 2), separable(c[5], c[5], 1)))                    # conv5: /32
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c[5], num_classes)
        self.widths = c[1:]  # output channels of conv1..conv5

    def forward(self, x):  # the classifier: (B, 3, H, W) -> logits (B, num_classes)
        return self.fc(self.pool(self.features(x)))

    def detection_parts(self):  # modules shared with the classifier, not copies
        stages = list(self.features[:4])  # conv1..conv4: model.backbone.freeze_at counts these
        return DetectionParts(trunk=nn.Sequential(*stages), stride=16, out_channels=self.widths[3],
                              box_head=nn.Sequential(self.features[4], self.pool), head_channels=self.widths[4],
                              stages=stages)

    def feature_stages(self):  # for a neck (FPN): every stage's output map
        return FeatureStages(list(self.features), [FeatureInfo(f"conv{i + 1}", ch, 2 ** (i + 1))
                                                   for i, ch in enumerate(self.widths)])


@hookimpl
def detkit_register_backbones(register):
    register("mobilenet_v1", MobileNetV1, family="mobilenet", paper="Howard et al. 2017")
