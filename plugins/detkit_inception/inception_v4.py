"""Inception-v4, Inception-ResNet-v1 and Inception-ResNet-v2 (Szegedy et al. 2017, "Inception-v4,
Inception-ResNet and the Impact of Residual Connections on Learning").

Built from the paper's figures: the stems (Fig. 3 for v4 and Inception-ResNet-v2, Fig. 14 for
Inception-ResNet-v1), Inception-A/B/C blocks (Figs. 4-6), the Inception-ResNet-A/B/C blocks (Figs. 10-13,
16-19) whose branch concatenation goes through a linear 1x1 convolution and is scaled by 0.1-0.3 before
the addition (Sec. 3.3: 0.17, 0.10, 0.20 here, as the reference implementation), and the grid reductions
(Reduction-A with the (k, l, m, n) of Table 1; Reduction-B, Figs. 8, 12, 18). "V" marks valid padding.
Block counts follow Fig. 9 and Fig. 15 (4/7/3 for v4; 5/10/5 for both Inception-ResNets). Parameter
counts (1000 classes): Inception-v4 42,679,816 (the common implementations' 42.7M); Inception-ResNet-v1
22,756,328; Inception-ResNet-v2 32,433,928 -- the widely used 55.8M model is the TF-slim variant, with a
different stem and 10/20/10 blocks, not the network of the paper's figures.

Detection: the trunk ends after the 17x17 blocks (stride 16); the RoI head is Reduction-B, the 8x8 blocks
and global average pooling, on 14x14 pooled features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts
from detkit_inception.googlenet import BasicConv2d


def conv(cin: int, cout: int, k, s: int = 1, valid: bool = False) -> BasicConv2d:
    k = (k, k) if isinstance(k, int) else k
    pad = (0, 0) if valid else (k[0] // 2, k[1] // 2)
    return BasicConv2d(cin, cout, kernel_size=k, stride=s, padding=pad)


def chain(cin: int, *specs) -> nn.Sequential:
    """A branch of convolutions: specs are (cout, kernel[, stride[, valid]])."""
    layers = []
    for spec in specs:
        layers.append(conv(cin, *spec))
        cin = spec[0]
    return nn.Sequential(*layers)


class Branches(nn.Module):
    """Parallel branches concatenated along channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


def avg_proj(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv(cin, cout, 1))


def stem_v4() -> nn.Sequential:
    """Fig. 3: 299x299x3 -> 35x35x384."""
    return nn.Sequential(
        chain(3, (32, 3, 2, True), (32, 3, 1, True), (64, 3)),
        Branches(nn.MaxPool2d(3, 2), conv(64, 96, 3, 2, True)),
        Branches(chain(160, (64, 1), (96, 3, 1, True)),
                 chain(160, (64, 1), (64, (7, 1)), (64, (1, 7)), (96, 3, 1, True))),
        Branches(conv(192, 192, 3, 2, True), nn.MaxPool2d(3, 2)))


def stem_resnet_v1() -> nn.Sequential:
    """Fig. 14: 299x299x3 -> 35x35x256."""
    return chain(3, (32, 3, 2, True), (32, 3, 1, True), (64, 3)).append(nn.MaxPool2d(3, 2)).extend(
        chain(64, (80, 1), (192, 3, 1, True), (256, 3, 2, True)))


def inception_a(cin: int = 384) -> Branches:
    return Branches(avg_proj(cin, 96), conv(cin, 96, 1), chain(cin, (64, 1), (96, 3)),
                    chain(cin, (64, 1), (96, 3), (96, 3)))


def inception_b(cin: int = 1024) -> Branches:
    return Branches(avg_proj(cin, 128), conv(cin, 384, 1), chain(cin, (192, 1), (224, (1, 7)), (256, (7, 1))),
                    chain(cin, (192, 1), (192, (1, 7)), (224, (7, 1)), (224, (1, 7)), (256, (7, 1))))


class InceptionC(nn.Module):
    def __init__(self, cin: int = 1536):
        super().__init__()
        self.pool = avg_proj(cin, 256)
        self.b1 = conv(cin, 256, 1)
        self.b3 = conv(cin, 384, 1)
        self.b3a, self.b3b = conv(384, 256, (1, 3)), conv(384, 256, (3, 1))
        self.d = chain(cin, (384, 1), (448, (3, 1)), (512, (1, 3)))
        self.da, self.db = conv(512, 256, (1, 3)), conv(512, 256, (3, 1))

    def forward(self, x: Tensor) -> Tensor:
        b3, d = self.b3(x), self.d(x)
        return torch.cat([self.pool(x), self.b1(x), self.b3a(b3), self.b3b(b3), self.da(d), self.db(d)], 1)


def reduction_a(cin: int, k: int, l: int, m: int, n: int) -> Branches:
    return Branches(nn.MaxPool2d(3, 2), conv(cin, n, 3, 2, True), chain(cin, (k, 1), (l, 3), (m, 3, 2, True)))


class ResidualInception(nn.Module):
    """x + scale * linear_1x1(concat(branches(x))), then ReLU (Fig. 20's scaling)."""

    def __init__(self, cin: int, branches: Branches, concat: int, scale: float, activate: bool = True):
        super().__init__()
        self.branches = branches
        self.project = nn.Conv2d(concat, cin, 1)
        self.scale, self.activate = scale, activate

    def forward(self, x: Tensor) -> Tensor:
        out = x + self.scale * self.project(self.branches(x))
        return torch.relu(out) if self.activate else out


class InceptionNet(Backbone):
    """Stem -> 35x35 blocks -> Reduction-A -> 17x17 blocks -> Reduction-B -> 8x8 blocks -> pool -> fc."""

    def __init__(self, stem: nn.Module, grid35: list[nn.Module], reduce_a: nn.Module, grid17: list[nn.Module],
                 reduce_b: nn.Module, grid8: list[nn.Module], channels17: int, channels8: int, num_classes: int,
                 dropout: float):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 299, 299), mean=(0.5,) * 3, std=(0.5,) * 3,
                                         roi_output_size=14, min_input_size=96)
        self.stem = stem
        self.grid35 = nn.Sequential(*grid35)
        self.reduction_a = reduce_a
        self.grid17 = nn.Sequential(*grid17)
        self.reduction_b = reduce_b
        self.grid8 = nn.Sequential(*grid8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels8, num_classes)
        self.channels17, self.channels8 = channels17, channels8

    def _head(self) -> nn.Sequential:
        return nn.Sequential(self.reduction_b, self.grid8, self.avgpool, nn.Flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.grid17(self.reduction_a(self.grid35(self.stem(x))))
        return self.fc(self.dropout(self._head()(x)))

    def detection_parts(self) -> DetectionParts:
        stages = [self.stem, self.grid35, nn.Sequential(self.reduction_a, self.grid17)]
        return DetectionParts(trunk=nn.Sequential(*stages), roi_head=self._head(), out_channels=self.channels17,
                              stride=16, head_channels=self.channels8, stages=stages)


def inception_v4(num_classes: int = 1000, dropout: float = 0.2) -> InceptionNet:
    reduce_b = Branches(nn.MaxPool2d(3, 2), chain(1024, (192, 1), (192, 3, 2, True)),
                        chain(1024, (256, 1), (256, (1, 7)), (320, (7, 1)), (320, 3, 2, True)))
    return InceptionNet(stem_v4(), [inception_a() for _ in range(4)], reduction_a(384, 192, 224, 256, 384),
                        [inception_b() for _ in range(7)], reduce_b, [InceptionC() for _ in range(3)],
                        1024, 1536, num_classes, dropout)


def inception_resnet_v1(num_classes: int = 1000, dropout: float = 0.2) -> InceptionNet:
    block_a = lambda: ResidualInception(256, Branches(conv(256, 32, 1), chain(256, (32, 1), (32, 3)),  # noqa: E731
                                                      chain(256, (32, 1), (32, 3), (32, 3))), 96, 0.17)
    block_b = lambda: ResidualInception(896, Branches(conv(896, 128, 1),  # noqa: E731
                                                      chain(896, (128, 1), (128, (1, 7)), (128, (7, 1)))), 256, 0.10)
    block_c = lambda last=False: ResidualInception(1792, Branches(  # noqa: E731
        conv(1792, 192, 1), chain(1792, (192, 1), (192, (1, 3)), (192, (3, 1)))), 384, 0.20, activate=not last)
    reduce_b = Branches(nn.MaxPool2d(3, 2), chain(896, (256, 1), (384, 3, 2, True)),
                        chain(896, (256, 1), (256, 3, 2, True)), chain(896, (256, 1), (256, 3), (256, 3, 2, True)))
    return InceptionNet(stem_resnet_v1(), [block_a() for _ in range(5)], reduction_a(256, 192, 192, 256, 384),
                        [block_b() for _ in range(10)], reduce_b, [block_c(i == 4) for i in range(5)],
                        896, 1792, num_classes, dropout)


def inception_resnet_v2(num_classes: int = 1000, dropout: float = 0.2) -> InceptionNet:
    block_a = lambda: ResidualInception(384, Branches(conv(384, 32, 1), chain(384, (32, 1), (32, 3)),  # noqa: E731
                                                      chain(384, (32, 1), (48, 3), (64, 3))), 128, 0.17)
    block_b = lambda: ResidualInception(1152, Branches(conv(1152, 192, 1),  # noqa: E731
                                                       chain(1152, (128, 1), (160, (1, 7)), (192, (7, 1)))), 384, 0.10)
    block_c = lambda last=False: ResidualInception(2144, Branches(  # noqa: E731
        conv(2144, 192, 1), chain(2144, (192, 1), (224, (1, 3)), (256, (3, 1)))), 448, 0.20, activate=not last)
    reduce_b = Branches(nn.MaxPool2d(3, 2), chain(1152, (256, 1), (384, 3, 2, True)),
                        chain(1152, (256, 1), (288, 3, 2, True)), chain(1152, (256, 1), (288, 3), (320, 3, 2, True)))
    return InceptionNet(stem_v4(), [block_a() for _ in range(5)], reduction_a(384, 256, 256, 384, 384),
                        [block_b() for _ in range(10)], reduce_b, [block_c(i == 4) for i in range(5)],
                        1152, 2144, num_classes, dropout)
