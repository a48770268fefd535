"""Inception-v4, Inception-ResNet-v1 and Inception-ResNet-v2 (Szegedy et al. 2017, "Inception-v4,
Inception-ResNet and the Impact of Residual Connections on Learning").

Built from the paper's figures: the stems (Fig. 3 for Inception-v4 and Inception-ResNet-v2, Fig. 14 for
Inception-ResNet-v1), Inception-A/B/C blocks (Figs. 4-6), the Inception-ResNet-A/B/C blocks (Figs. 10-13,
16-19) whose branch concatenation goes through a linear 1x1 convolution and is scaled by 0.1-0.3 before
the addition (Sec. 3.3, Fig. 20: 0.17, 0.10, 0.20 here, the authors' released values), and the grid
reductions (Reduction-A with the (k, l, m, n) of Table 1; Reduction-B, Figs. 8, 12, 18). "V" in the
figures (``valid=True`` here) marks unpadded convolutions. Block counts follow Fig. 9 and Fig. 15 (4/7/3
for Inception-v4; 5/10/5 for the Inception-ResNets).

Parameter counts (1000 classes), all asserted in the tests:
    inception_v4: 42,679,816, the "42.7M" of the common implementations (timm ``inception_v4``, ported
        from TF-slim), which use the same figures.
    inception_resnet_v2: 55,843,464 with the default ``layout="slim"``: the network Google released as
        Inception-ResNet-v2 (TF-slim ``inception_resnet_v2``; timm, Keras and pretrainedmodels copy it,
        timm lists 55.8M). It differs from the paper's figures: Inception-v3's stem plus a 35x35
        Inception-A-like module (320 channels), 10/20/10 residual blocks, a last block with scale 1 and
        no ReLU, and a 1x1 convolution to 1536 channels before pooling. ``layout="paper"`` builds the
        figures' network instead (Fig. 3 stem, 5/10/5 blocks; 32,433,928 parameters; Fig. 17/19 print
        1154 and 2048 for the projections, which cannot add to 1152/2144-channel inputs, so the input
        widths are used).
    inception_resnet_v1: 22,756,328, the figures' network (nothing common to compare with).

Detection: the trunk is the stem, the 35x35 blocks, Reduction-A and the 17x17 blocks (stride 16; an
unpadded stem, so an H x H input gives an (H/16 - 2)-sided map when H is a multiple of 32, 299 -> 17).
The RoI head is Reduction-B, the 8x8 blocks (and, for the slim layout, its 1x1 convolution) and global
average pooling, on 14x14 pooled features (Reduction-B makes them 6x6).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.backbones import Backbone, DetectionParts, FeatureInfo, FeatureStages
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


#: a stem's feature maps, one per resolution: (index in the stem after the layer that ends it, channels) at
#: strides 2, 4 and 8 (147x147, 71x71 and 35x35 for a 299x299 input)
StemMaps = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
STEM_V4_MAPS: StemMaps = ((1, 64), (3, 192), (4, 384))


def stem_v4() -> nn.Sequential:
    """Fig. 3: 299x299x3 -> 35x35x384."""
    return nn.Sequential(
        chain(3, (32, 3, 2, True), (32, 3, 1, True), (64, 3)),
        Branches(nn.MaxPool2d(3, 2), conv(64, 96, 3, 2, True)),
        Branches(chain(160, (64, 1), (96, 3, 1, True)),
                 chain(160, (64, 1), (64, (7, 1)), (64, (1, 7)), (96, 3, 1, True))),
        Branches(conv(192, 192, 3, 2, True), nn.MaxPool2d(3, 2)))


STEM_RESNET_V1_MAPS: StemMaps = ((3, 64), (6, 192), (7, 256))


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
    """Stem -> 35x35 blocks -> Reduction-A -> 17x17 blocks -> Reduction-B -> 8x8 blocks -> pool -> fc.

    images (B, 3, H, W), H, W >= 75 -> logits (B, num_classes). ``channels17`` / ``channels8``: widths of
    the 17x17 and the final 8x8 grid (the trunk's out_channels and the RoI head's head_channels);
    ``stem_maps``: where the stem's resolutions end (:data:`StemMaps`).
    """

    def __init__(self, stem: nn.Module, grid35: list[nn.Module], reduce_a: nn.Module, grid17: list[nn.Module],
                 reduce_b: nn.Module, grid8: list[nn.Module], channels17: int, channels8: int, num_classes: int,
                 dropout: float, stem_maps: StemMaps):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
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
        self.stem_maps = stem_maps

    def _head(self) -> nn.Sequential:
        return nn.Sequential(self.reduction_b, self.grid8, self.avgpool, nn.Flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.grid17(self.reduction_a(self.grid35(self.stem(x))))
        return self.fc(self.dropout(self._head()(x)))

    def detection_parts(self) -> DetectionParts:
        stages = [self.stem, self.grid35, nn.Sequential(self.reduction_a, self.grid17)]
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=self._head(), out_channels=self.channels17,
                              stride=16, head_channels=self.channels8, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per resolution, each ending before the next grid reduction (which starts the next
        stage): ``grid147`` and ``grid71`` (the stem's parts at strides 2 and 4, 64 and 192 channels),
        ``grid35`` (the rest of the stem and the 35x35 blocks, stride 8), ``grid17`` (Reduction-A and the
        17x17 blocks, 16), ``grid8`` (Reduction-B and the 8x8 blocks, 32); the names are the grid sides of a
        299x299 input, which unpadded convolutions make smaller than 299 / stride."""
        (end2, c2), (end4, c4), (end8, c8) = self.stem_maps
        stages = [self.stem[:end2], self.stem[end2:end4], nn.Sequential(self.stem[end4:end8], self.grid35),
                  nn.Sequential(self.reduction_a, self.grid17), nn.Sequential(self.reduction_b, self.grid8)]
        info = [FeatureInfo("grid147", c2, 2), FeatureInfo("grid71", c4, 4), FeatureInfo("grid35", c8, 8),
                FeatureInfo("grid17", self.channels17, 16), FeatureInfo("grid8", self.channels8, 32)]
        return FeatureStages(stages, info)


def inception_v4(num_classes: int = 1000, dropout: float = 0.2) -> InceptionNet:
    """Inception-v4 (Fig. 9; 42,679,816 parameters): no residual connections, dropout keeps 0.8."""
    reduce_b = Branches(nn.MaxPool2d(3, 2), chain(1024, (192, 1), (192, 3, 2, True)),
                        chain(1024, (256, 1), (256, (1, 7)), (320, (7, 1)), (320, 3, 2, True)))
    return InceptionNet(stem_v4(), [inception_a() for _ in range(4)], reduction_a(384, 192, 224, 256, 384),
                        [inception_b() for _ in range(7)], reduce_b, [InceptionC() for _ in range(3)],
                        1024, 1536, num_classes, dropout, STEM_V4_MAPS)


def inception_resnet_v1(num_classes: int = 1000, dropout: float = 0.2) -> InceptionNet:
    """Inception-ResNet-v1 (Fig. 15 with the Fig. 14 stem; 22,756,328 parameters)."""
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
                        896, 1792, num_classes, dropout, STEM_RESNET_V1_MAPS)


def _inception_resnet_v2_paper(num_classes: int, dropout: float) -> InceptionNet:
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
                        1152, 2144, num_classes, dropout, STEM_V4_MAPS)


STEM_SLIM_MAPS: StemMaps = ((1, 64), (3, 192), (5, 320))


def stem_slim() -> nn.Sequential:
    """The released Inception-ResNet-v2's stem: Inception-v3's stem (299 -> 35x35x192) and a 35x35
    Inception module (1x1 96 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg pool -> 1x1 64) to 320."""
    return nn.Sequential(
        chain(3, (32, 3, 2, True), (32, 3, 1, True), (64, 3)), nn.MaxPool2d(3, 2),
        chain(64, (80, 1), (192, 3, 1, True)), nn.MaxPool2d(3, 2),
        Branches(conv(192, 96, 1), chain(192, (48, 1), (64, 5)), chain(192, (64, 1), (96, 3), (96, 3)),
                 avg_proj(192, 64)))


def _inception_resnet_v2_slim(num_classes: int, dropout: float) -> InceptionNet:
    block_a = lambda: ResidualInception(320, Branches(conv(320, 32, 1), chain(320, (32, 1), (32, 3)),  # noqa: E731
                                                      chain(320, (32, 1), (48, 3), (64, 3))), 128, 0.17)
    block_b = lambda: ResidualInception(1088, Branches(conv(1088, 192, 1),  # noqa: E731
                                                       chain(1088, (128, 1), (160, (1, 7)), (192, (7, 1)))), 384, 0.10)
    block_c = lambda scale=0.20, last=False: ResidualInception(2080, Branches(  # noqa: E731
        conv(2080, 192, 1), chain(2080, (192, 1), (224, (1, 3)), (256, (3, 1)))), 448, scale, activate=not last)
    # Reduction-A with (k, l, m, n) = (256, 256, 384, 384): 320 + 384 + 384 = 1088 channels.
    reduce_a = reduction_a(320, 256, 256, 384, 384)
    reduce_b = Branches(chain(1088, (256, 1), (384, 3, 2, True)), chain(1088, (256, 1), (288, 3, 2, True)),
                        chain(1088, (256, 1), (288, 3), (320, 3, 2, True)), nn.MaxPool2d(3, 2))
    grid8 = [block_c() for _ in range(9)] + [block_c(scale=1.0, last=True), conv(2080, 1536, 1)]
    return InceptionNet(stem_slim(), [block_a() for _ in range(10)], reduce_a, [block_b() for _ in range(20)],
                        reduce_b, grid8, 1088, 1536, num_classes, dropout, STEM_SLIM_MAPS)


def inception_resnet_v2(num_classes: int = 1000, dropout: float = 0.2, layout: str = "slim") -> InceptionNet:
    """Inception-ResNet-v2: ``layout="slim"`` the released network (55,843,464 parameters), ``"paper"``
    the network of the paper's figures (32,433,928); see the module docstring."""
    layouts = {"slim": _inception_resnet_v2_slim, "paper": _inception_resnet_v2_paper}
    if layout not in layouts:
        raise ValueError(f"inception_resnet_v2: layout must be one of {sorted(layouts)}, got {layout!r}")
    return layouts[layout](num_classes, dropout)
