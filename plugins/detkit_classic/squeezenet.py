"""SqueezeNet 1.0 and 1.1 (Iandola et al. 2016): fire modules (a 1x1 squeeze layer feeding parallel 1x1
and 3x3 expand layers), no fully connected layers. torchvision's names and parameter counts.

Detection: the trunk is everything before the last fire module (stride 16); the RoI head is that fire
module and global average pooling (512 channels)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts, FeatureStages, Variant, init_weights

from detkit_classic.early import stride_stages


class Fire(nn.Module):
    """A fire module (Sec. 3.2): squeeze to ``squeeze`` channels with 1x1 convolutions, then expand with
    ``e1`` 1x1 and ``e3`` 3x3 convolutions side by side: (B, cin, H, W) -> (B, e1 + e3, H, W)."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.out_channels = e1 + e3

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(Backbone):
    """SqueezeNet ``version`` "1_0" (Table 1 of the paper) or "1_1" (the SqueezeNet repository's v1.1:
    3x3 conv1 of 64 filters and earlier pooling, 2.4x less computation, same accuracy)."""

    def __init__(self, version: str = "1_0", num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        if version == "1_0":
            self.features = nn.Sequential(
                nn.Conv2d(3, 96, 7, 2), nn.ReLU(inplace=True), pool(),
                Fire(96, 16, 64, 64), Fire(128, 16, 64, 64), Fire(128, 32, 128, 128), pool(),
                Fire(256, 32, 128, 128), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
                pool(), Fire(512, 64, 256, 256))
        elif version == "1_1":
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool(),
                Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
                Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
                Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        else:
            raise ValueError(f"SqueezeNet version {version!r}: expected '1_0' or '1_1'")
        final = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), final, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        # torchvision's: Kaiming-uniform weights, the class-map convolution N(0, 0.01) (it comes last), zero biases
        init_weights(self, conv=nn.init.kaiming_uniform_, bias=0.0, exclude=[final])
        nn.init.normal_(final.weight, 0.0, 0.01)
        nn.init.zeros_(final.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, num_classes): a 1x1 conv to class maps, averaged."""
        return self.classifier(self.features(x)).flatten(1)

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)
        trunk_layers = layers[:-1]
        # A stage ends at each max pooling: conv1, then the fire modules of each resolution.
        ends = [i + 1 for i, m in enumerate(trunk_layers) if isinstance(m, nn.MaxPool2d)]
        bounds = [0] + ends + ([len(trunk_layers)] if ends[-1] < len(trunk_layers) else [])
        stages = [nn.Sequential(*trunk_layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        head = nn.Sequential(layers[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return DetectionParts(trunk=nn.Sequential(*trunk_layers), box_head=head, out_channels=512, stride=16,
                              head_channels=512, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """``features`` by stride, each stage from the max pooling before it, fire9 (in the RoI head) last:
        1.0 conv1 (96 channels, stride 2), fire4 (256, 4), fire8 (512, 8), fire9 (512, 16); 1.1 conv1 (64, 2),
        fire3 (128, 4), fire5 (256, 8), fire9 (512, 16). conv10 is the classifier; there is no stride-32 map."""
        return stride_stages(self.features)


PAPER = "Iandola et al. 2016"
DEFAULTS = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7, min_input_size=64)
OPTIONS = dict(num_classes=1000, dropout=0.5)
VARIANTS: list[Variant] = [
    Variant("squeezenet1_0", SqueezeNet, PAPER, DEFAULTS, args=dict(version="1_0"), options=OPTIONS),
    Variant("squeezenet1_1", SqueezeNet, PAPER, DEFAULTS, args=dict(version="1_1"), options=OPTIONS),
]
