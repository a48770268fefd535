"""Very deep convolutional networks (Simonyan & Zisserman 2015, Table 1).

Configurations A (VGG-11), A-LRN, B (VGG-13), C (VGG-16 with 1x1 convolutions in
the last three blocks), D (VGG-16) and E (VGG-19), and batch-normalised forms;
parameter names follow torchvision (``features.N``, ``classifier.N``), so its
checkpoints load as they are. Detection (Fast R-CNN Sec. 4): the trunk is
conv1_1..conv5_3 without pool5 (stride 16, 512 channels) and the RoI head is
fc6/fc7 on 7x7 RoI-pooled features. For necks, the feature stages are the five
conv blocks and pool5 (strides 1 to 16, then 32: pool5 is C5).
"""
from __future__ import annotations

from torch import Tensor, nn

from detkit.backbones import (Backbone, BackboneDefaults, DetectionParts, FeatureStages, Variant, init_weights,
                              kaiming_normal_init, normal_init)

from detkit_classic.early import stride_stages

# Numbers are 3x3 conv widths, "1:N" a 1x1 conv of width N, "M" max pooling, "L" local response normalisation.
CONFIGS: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "L", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, "1:256", "M", 512, 512, "1:512", "M", 512, 512, "1:512", "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(cfg: list, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "L":
            # AlexNet's LRN (n=5, alpha=1e-4, beta=0.75, k=2); torch divides alpha by n, the paper does not.
            layers.append(nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0))
        else:
            k, width = (1, int(v[2:])) if isinstance(v, str) else (3, v)
            layers.append(nn.Conv2d(cin, width, k, padding=k // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            cin = width
    return nn.Sequential(*layers)


class VGG(Backbone):
    """A VGG configuration: ``features`` (conv blocks), adaptive 7x7 average pooling, fc6-fc7-fc8."""

    def __init__(self, config: str, batch_norm: bool = False, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = make_features(CONFIGS[config], batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        init_weights(self, conv=kaiming_normal_init("fan_out"), linear=normal_init(0.01), bias=0.0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        # Five blocks, each ending at a max pool; the trunk stops before pool5.
        bounds = [0] + [p + 1 for p in pools[:4]] + [pools[4]]
        stages = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        fc67 = nn.Sequential(nn.Flatten(1), *list(self.classifier)[:-1])
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=fc67, out_channels=512, stride=16,
                              head_channels=4096, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per conv block, each from the pooling before it, so each ends with the deepest map at its
        stride: conv1 (64 channels, stride 1), conv2 (128, 2), conv3 (256, 4), conv4 (512, 8), conv5 (512,
        16), pool5 (512, 32). FPN reads conv3_3 as C2, conv4_3 as C3, conv5_3 as C4 (the Fast R-CNN
        trunk's map) and pool5 as C5 (VGG-16's names)."""
        return stride_stages(self.features, names=["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"])


PAPER = "Simonyan & Zisserman 2015"
#: fc6 takes pool5's 7x7x512 at 224x224, so RoIs are pooled to 7x7
DEFAULTS = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7)


def variant(name: str, config: str, batch_norm: bool = False) -> Variant:
    return Variant(name, VGG, PAPER, DEFAULTS, args=dict(config=config, batch_norm=batch_norm),
                   options=dict(num_classes=1000, dropout=0.5))


VARIANTS: list[Variant] = [
    variant("vgg11", "A"), variant("vgg11_lrn", "A-LRN"), variant("vgg13", "B"), variant("vgg16_c", "C"),
    variant("vgg16", "D"), variant("vgg19", "E"),
    variant("vgg11_bn", "A", True), variant("vgg13_bn", "B", True), variant("vgg16_bn", "D", True),
    variant("vgg19_bn", "E", True),
]
