"""The early CNNs of the reference notes: the small MNIST/CIFAR network, LeNet-5,
AlexNet (CaffeNet, and torchvision's variant), ZFNet, Network in Network, a
Maxout network and the PReLU-nets (MSRA models A, B, C).

Layer sizes follow the notes' tables (survey notes, "convolutional network",
"LeNet-5", "AlexNet (CaffeNet)"), which the summary tests check line by line.
For detection every network exposes the trunk the literature uses (the
convolutional layers up to, not including, the last pooling layer) and a RoI
head made of its fully connected layers (or, for the all-convolutional NIN, its
last mlpconv block and global pooling).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts


def _fc_head(in_features: int, widths: list[int], dropout: float, act=nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(1)]
    for w in widths:
        layers += [nn.Linear(in_features, w), act(inplace=True) if act is nn.ReLU else act()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = w
    return nn.Sequential(*layers)


class SequentialBackbone(Backbone):
    """A network that is ``features`` (conv stack ending in a pool) -> ``pool`` -> ``head`` -> ``fc``.

    Detection: trunk = ``features`` without its last pooling layer; RoI head = ``head``
    on ``roi_output_size`` x ``roi_output_size`` pooled features.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential, head_channels: int, fc: nn.Module,
                 defaults: BackboneDefaults, out_channels: int, stride: int, pool: nn.Module | None = None):
        super().__init__()
        self.defaults = defaults
        self.features = features
        self.avgpool = pool if pool is not None else nn.Identity()
        self.head = head
        self.fc = fc
        self._out_channels, self._stride, self._head_channels = out_channels, stride, head_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.avgpool(self.features(x))))

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)
        last_pool = max(i for i, m in enumerate(layers) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)))
        trunk_layers = layers[:last_pool]
        return DetectionParts(trunk=nn.Sequential(*trunk_layers), roi_head=self.head,
                              out_channels=self._out_channels, stride=self._stride,
                              head_channels=self._head_channels, stages=[nn.Sequential(*trunk_layers)])


# ----------------------------------------------------------------------------- small CNN and LeNet-5


def mnist_cnn(num_classes: int = 10, in_channels: int = 1, input_side: int = 28) -> SequentialBackbone:
    """The notes' small network: conv(5, 32), pool(2), conv(5, 64), pool(2), fc(100), fc(10).

    ``in_channels=3, input_side=32`` is its CIFAR-10 form.
    """
    side = ((input_side - 4) // 2 - 4) // 2
    features = nn.Sequential(nn.Conv2d(in_channels, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    head = _fc_head(64 * side * side, [100], 0.0)
    defaults = BackboneDefaults(input_size=(in_channels, input_side, input_side), mean=(0.5,) * in_channels,
                                std=(0.5,) * in_channels, roi_output_size=side, min_input_size=input_side)
    return SequentialBackbone(features, head, 100, nn.Linear(100, num_classes), defaults, 64, 2,
                              pool=nn.AdaptiveMaxPool2d(side))


def cifar_cnn(num_classes: int = 10) -> SequentialBackbone:
    return mnist_cnn(num_classes, in_channels=3, input_side=32)


class ScaledTanh(nn.Module):
    """LeNet-5's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (LeCun et al. 1998, App. A)."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(2.0 / 3.0 * x)


def lenet5(num_classes: int = 10) -> SequentialBackbone:
    """LeNet-5 as the notes' table counts it: conv(5, 6), avg(2), conv(5, 16), avg(2), conv(5, 120),
    fc(84), output(10) on 32x32 inputs.

    The notes count the subsampling layers with 0 parameters and the RBF output layer with
    850 = 10 x (84 + 1); here the output is a linear layer of that size, the standard
    modern substitute for the Euclidean RBF units, and C3 is fully connected to S2.
    """
    features = nn.Sequential(nn.Conv2d(1, 6, 5), ScaledTanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), ScaledTanh(),
                             nn.AvgPool2d(2))
    head = nn.Sequential(nn.Conv2d(16, 120, 5), ScaledTanh(), nn.Flatten(1), nn.Linear(120, 84), ScaledTanh())
    defaults = BackboneDefaults(input_size=(1, 32, 32), mean=(0.5,), std=(0.5,), roi_output_size=5,
                                min_input_size=32)
    return SequentialBackbone(features, head, 84, nn.Linear(84, num_classes), defaults, 16, 2,
                              pool=nn.AdaptiveAvgPool2d(5))


# ----------------------------------------------------------------------------- AlexNet and ZFNet


def _alexnet_like(conv1: tuple[int, int, int], widths: tuple[int, int, int, int, int], num_classes: int,
                  dropout: float, lrn: bool, input_side: int, roi: int, ceil: bool = False) -> SequentialBackbone:
    k1, s1, p1 = conv1
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=ceil)  # noqa: E731  ZFNet: 110 -> 55 -> 26 -> 13 -> 6
    w1, w2, w3, w4, w5 = widths
    norm = (lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)) if lrn else (lambda: nn.Identity())
    # CaffeNet order: conv, relu, pool, norm (the notes: "pool/norm switched").
    features = nn.Sequential(
        nn.Conv2d(3, w1, k1, s1, p1), nn.ReLU(inplace=True), pool(), norm(),
        nn.Conv2d(w1, w2, 5, 1 if k1 == 11 else 2, 2 if k1 == 11 else 0), nn.ReLU(inplace=True),
        pool(), norm(),
        nn.Conv2d(w2, w3, 3, 1, 1), nn.ReLU(inplace=True),
        nn.Conv2d(w3, w4, 3, 1, 1), nn.ReLU(inplace=True),
        nn.Conv2d(w4, w5, 3, 1, 1), nn.ReLU(inplace=True), pool(),
    )
    features = nn.Sequential(*[m for m in features if not isinstance(m, nn.Identity)])
    head = _fc_head(w5 * 6 * 6, [4096, 4096], dropout)
    defaults = BackboneDefaults(input_size=(3, input_side, input_side), roi_output_size=roi, min_input_size=96)
    return SequentialBackbone(features, head, 4096, nn.Linear(4096, num_classes), defaults, w5, 16,
                              pool=nn.AdaptiveMaxPool2d(6))


def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> SequentialBackbone:
    """AlexNet as CaffeNet (Krizhevsky et al. 2012; the notes' table): 96-256-384-384-256, LRN, overlapping
    3x3/2 pooling, dropout 0.5, 227x227 inputs, one tower (no grouping), 62,378,344 parameters."""
    return _alexnet_like((11, 4, 0), (96, 256, 384, 384, 256), num_classes, dropout, True, 227, 6)


def zfnet(num_classes: int = 1000, dropout: float = 0.5) -> SequentialBackbone:
    """ZFNet (Zeiler & Fergus 2014): AlexNet with a 7x7 stride-2 first layer (and conv2 stride 2)."""
    return _alexnet_like((7, 2, 1), (96, 256, 384, 384, 256), num_classes, dropout, True, 224, 6, ceil=True)


def zfnet_512_1024_512(num_classes: int = 1000, dropout: float = 0.5) -> SequentialBackbone:
    """ZFNet with conv3-5 widened to 512, 1024, 512 (the notes' variant)."""
    return _alexnet_like((7, 2, 1), (96, 256, 512, 1024, 512), num_classes, dropout, True, 224, 6, ceil=True)


class AlexNetTV(Backbone):
    """torchvision's AlexNet (the "one weird trick" variant, 64-192-384-256-256, no LRN): same names and
    parameter count (61,100,840), so its checkpoints load."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=6, min_input_size=64)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

    def detection_parts(self) -> DetectionParts:
        trunk = nn.Sequential(*list(self.features)[:-1])
        return DetectionParts(trunk=trunk, roi_head=nn.Sequential(nn.Flatten(1), *list(self.classifier)[:-1]),
                              out_channels=256, stride=16, head_channels=4096, stages=[trunk])


# ----------------------------------------------------------------------------- Network in Network, Maxout


def _mlpconv(cin: int, widths: tuple[int, int, int], k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    """One mlpconv layer (Lin et al. 2014): a kxk convolution followed by two 1x1 convolutions, ReLU each."""
    a, b, c = widths
    return [nn.Conv2d(cin, a, k, stride, padding), nn.ReLU(inplace=True), nn.Conv2d(a, b, 1), nn.ReLU(inplace=True),
            nn.Conv2d(b, c, 1), nn.ReLU(inplace=True)]


class NIN(Backbone):
    """Network in Network, ImageNet form (Lin et al. 2014; the Caffe model zoo's nin_imagenet): four mlpconv
    layers, the last producing one map per class, then global average pooling instead of fully connected
    layers."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7, min_input_size=64)
        self.features = nn.Sequential(
            *_mlpconv(3, (96, 96, 96), 11, 4), nn.MaxPool2d(3, 2, ceil_mode=True),
            *_mlpconv(96, (256, 256, 256), 5, 1, 2), nn.MaxPool2d(3, 2, ceil_mode=True),
            *_mlpconv(256, (384, 384, 384), 3, 1, 1))
        self.pool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Sequential(*_mlpconv(384, (1024, 1024, num_classes), 3, 1, 1))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.gap(self.classifier(self.dropout(self.pool3(self.features(x))))))

    def detection_parts(self) -> DetectionParts:
        # The class maps of the last mlpconv are class-specific; the RoI head stops at its first 1x1 layer.
        head = nn.Sequential(*list(self.classifier)[:4], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return DetectionParts(trunk=self.features, roi_head=head, out_channels=384, stride=16, head_channels=1024,
                              stages=[nn.Sequential(*list(self.features)[:7]), nn.Sequential(*list(self.features)[7:14])])


class Maxout(nn.Module):
    """Max over ``pieces`` groups of channels (Goodfellow et al. 2013): (B, C*k, H, W) -> (B, C, H, W)."""

    def __init__(self, pieces: int):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        return x.view(b, c // self.pieces, self.pieces, *x.shape[2:]).amax(dim=2)


class MaxoutCNN(Backbone):
    """The CIFAR-10 maxout network of Goodfellow et al. 2013: three convolutional maxout layers
    (96, 192, 192 units; 2, 2, 2 pieces; 8x8, 8x8, 5x5 kernels with max pooling) and a fully connected
    maxout layer of 500 units with 5 pieces, dropout on every layer."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                         roi_output_size=4, min_input_size=32)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96 * 2, 8, padding=4), Maxout(2), nn.MaxPool2d(4, 2, padding=1), nn.Dropout(dropout),
            nn.Conv2d(96, 192 * 2, 8, padding=3), Maxout(2), nn.MaxPool2d(4, 2, padding=1), nn.Dropout(dropout),
            nn.Conv2d(192, 192 * 2, 5, padding=3), Maxout(2), nn.MaxPool2d(2, 2))
        self.pool = nn.AdaptiveMaxPool2d(4)
        self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(dropout), nn.Linear(192 * 16, 500 * 5), _Maxout1d(5))
        self.fc = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.pool(self.features(x))))

    def detection_parts(self) -> DetectionParts:
        trunk = nn.Sequential(*list(self.features)[:-1])
        return DetectionParts(trunk=trunk, roi_head=self.head, out_channels=192, stride=4, head_channels=500,
                              stages=[trunk])


class _Maxout1d(nn.Module):
    def __init__(self, pieces: int):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], -1, self.pieces).amax(dim=2)


def nin(num_classes: int = 1000, dropout: float = 0.5) -> NIN:
    return NIN(num_classes, dropout)


def maxout_cnn(num_classes: int = 10, dropout: float = 0.5) -> MaxoutCNN:
    return MaxoutCNN(num_classes, dropout)


# ----------------------------------------------------------------------------- PReLU-nets


class SpatialPyramidPool(nn.Module):
    """Max pooling into fixed grids of several sizes, concatenated (He et al. 2014):
    (B, C, H, W) -> (B, C * sum(l^2))."""

    def __init__(self, levels: tuple[int, ...] = (7, 3, 2, 1)):
        super().__init__()
        self.levels = tuple(levels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, level).flatten(1) for level in self.levels], dim=1)


class PReLUNet(Backbone):
    """The MSRA PReLU-nets (He et al. 2015, Table 3): a 7x7/2 conv, then three stages of 3x3 convs at
    56, 28 and 14 pixels (5 layers each for model A; 6 for B; 6 and wider, 384/768/896, for C), an SPP layer
    {7, 3, 2, 1} and fc 4096-4096-1000, with parametric ReLUs (one slope per channel) and the paper's
    initialisation, std = sqrt(2 / (k^2 c)) with the PReLU slopes' gain."""

    def __init__(self, depth: int, widths: tuple[int, int, int], num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7, min_input_size=64)
        layers: list[nn.Module] = [nn.Conv2d(3, 96, 7, 2, 3), nn.PReLU(96, 0.25), nn.MaxPool2d(3, 2, 1)]
        cin = 96
        self.stage_ends = []
        for i, w in enumerate(widths):
            for _ in range(depth):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.PReLU(w, 0.25)]
                cin = w
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.spp = SpatialPyramidPool((7, 3, 2, 1))
        bins = 49 + 9 + 4 + 1
        self.classifier = nn.Sequential(nn.Linear(cin * bins, 4096), nn.PReLU(4096, 0.25), nn.Dropout(dropout),
                                        nn.Linear(4096, 4096), nn.PReLU(4096, 0.25), nn.Dropout(dropout),
                                        nn.Linear(4096, num_classes))
        self._out = cin
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # He et al. 2015, Eq. 10 with a = 0.25: std = sqrt(2 / ((1 + a^2) n)).
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / ((1 + 0.25**2) * fan_in)))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # The last stage's pooling is replaced by SPP in the paper; features end with a pool we skip.
        return self.classifier(self.spp(self.features[:-1](x)))

    def detection_parts(self) -> DetectionParts:
        trunk = nn.Sequential(*list(self.features)[:-1])
        head = nn.Sequential(self.spp, *list(self.classifier)[:-1])
        return DetectionParts(trunk=trunk, roi_head=head, out_channels=self._out, stride=16, head_channels=4096,
                              stages=[nn.Sequential(*list(self.features)[:3])])


def prelu_net_a(num_classes: int = 1000) -> PReLUNet:
    return PReLUNet(5, (256, 512, 512), num_classes)


def prelu_net_b(num_classes: int = 1000) -> PReLUNet:
    return PReLUNet(6, (256, 512, 512), num_classes)


def prelu_net_c(num_classes: int = 1000) -> PReLUNet:
    return PReLUNet(6, (384, 768, 896), num_classes)


VARIANTS = {
    "mnist_cnn": mnist_cnn, "cifar_cnn": cifar_cnn, "lenet5": lenet5, "alexnet": alexnet, "alexnet_tv": AlexNetTV,
    "zfnet": zfnet, "zfnet_512_1024_512": zfnet_512_1024_512, "nin": nin, "maxout_cnn": maxout_cnn,
    "prelu_net_a": prelu_net_a, "prelu_net_b": prelu_net_b, "prelu_net_c": prelu_net_c,
}
