"""The early CNNs of the reference notes: the small MNIST/CIFAR network, LeNet-5,
AlexNet (CaffeNet, and torchvision's variant), ZFNet, Network in Network (ImageNet
and CIFAR-10), a Maxout network and the PReLU-nets (MSRA models A, B, C).

Layer sizes follow the notes' tables (survey notes, "convolutional network",
"LeNet-5", "AlexNet (CaffeNet)"), which the summary tests check line by line.
For detection every network exposes the cut Fast R-CNN (Sec. 2.1) makes in
CaffeNet and VGG: RoI pooling takes the place of the last pooling layer, so the
trunk is the convolutional layers before it and the RoI head is what follows it
up to, not including, the classifier layer (the fully connected layers; for the
all-convolutional NIN, its class-map block without the class-specific 1x1
convolution, then global pooling; for the PReLU-nets, SPP and fc1-fc2). For necks
(FPN), each network also exposes its whole convolutional body, RoI-head convolutions
included, as one stage per stride (:func:`stride_stages`).
"""
from __future__ import annotations

from itertools import takewhile
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import (INCEPTION_MEAN, INCEPTION_STD, Backbone, BackboneDefaults, DetectionParts, FeatureInfo,
                              FeatureStages, Variant, init_weights, kaiming_normal_init, normal_init)


def _fc_head(in_features: int, widths: list[int], dropout: float) -> nn.Sequential:
    """Flatten, then fully connected layers each followed by ReLU (and dropout when ``dropout > 0``)."""
    layers: list[nn.Module] = [nn.Flatten(1)]
    for w in widths:
        layers += [nn.Linear(in_features, w), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = w
    return nn.Sequential(*layers)


def _last_pool(layers: list[nn.Module]) -> int:
    return max(i for i, m in enumerate(layers) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)))


def stages_at_convolutions(layers: list[nn.Module]) -> list[nn.Module]:
    """Split a layer list into stages that each start at a convolution (conv1 block, conv2 block, ...),
    so ``freeze_at = k`` freezes conv1..convk as in Fast R-CNN's fine-tuning of CaffeNet and ZF."""
    stages: list[list[nn.Module]] = [[]]
    for m in layers:
        if isinstance(m, nn.Conv2d) and any(isinstance(q, nn.Conv2d) for q in stages[-1]):
            stages.append([])
        stages[-1].append(m)
    return [nn.Sequential(*s) for s in stages]


def stride_stages(layers: Sequence[nn.Module], names: Sequence[str] | None = None) -> FeatureStages:
    """Split a feed-forward convolutional body (existing modules, input to output) into one stage per stride.

    A stage starts at each subsampling layer (a convolution or pooling of stride > 1), so its output is the
    deepest map at its stride, the one FPN reads. Channels and strides are read from the layers: a layer's
    ``out_channels`` (convolutions, fire modules) or a :class:`Maxout`'s pieces, and its ``stride``. A stage
    is named after the layer its output comes from: ``conv{n}`` for the n-th weighted layer (a fire module
    is ``fire{n}``, the paper's numbering), ``pool{n}`` for the pooling after it (Caffe's names: AlexNet's
    pool5); ``names`` overrides them.
    """
    stages: list[list[nn.Module]] = []
    ends: list[tuple[int, int, str]] = []  # (channels, stride, name) after each stage
    channels, stride, weighted, name = 0, 1, 0, ""
    for m in layers:
        step = getattr(m, "stride", 1)  # convolutions and pooling; 1 for the rest
        step = step if isinstance(step, int) else step[0]
        if not stages or step > 1:
            stages.append([])
            ends.append((0, 0, ""))
        stride *= step
        channels = channels // m.pieces if isinstance(m, Maxout) else getattr(m, "out_channels", channels)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            name = f"pool{weighted}"
        elif any(isinstance(q, nn.Conv2d) for q in m.modules()):
            weighted += 1
            name = f"{'conv' if isinstance(m, nn.Conv2d) else type(m).__name__.lower()}{weighted}"
        stages[-1].append(m)
        ends[-1] = (channels, stride, name)
    names = [n for _, _, n in ends] if names is None else list(names)
    if len(names) != len(stages):
        raise ValueError(f"stride_stages: {len(stages)} stages but {len(names)} names {names}")
    return FeatureStages([nn.Sequential(*st) for st in stages],
                         [FeatureInfo(n, c, s) for n, (c, s, _) in zip(names, ends)])


class SequentialBackbone(Backbone):
    """A network that is ``features`` (a conv stack that contains the last pooling layer) -> ``pool`` ->
    ``head`` -> ``fc``.

    ``pool`` is an adaptive pooling to the grid ``head`` expects (an identity at the design input
    size), so the classifier also runs on other input sizes. Detection follows Fast R-CNN (Sec. 2.1):
    RoI pooling takes the place of the last pooling layer, so the trunk is ``features`` up to it
    (stride ``stride``), and the RoI head is whatever follows it in ``features`` plus ``head``, on
    ``roi_output_size`` x ``roi_output_size`` pooled features.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential, head_channels: int, fc: nn.Module,
                 out_channels: int, stride: int, pool: nn.Module):
        super().__init__()
        self.features = features
        self.avgpool = pool
        self.head = head
        self.fc = fc
        self._out_channels, self._stride, self._head_channels = out_channels, stride, head_channels

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.fc(self.head(self.avgpool(self.features(x))))

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)
        cut = _last_pool(layers)
        trunk_layers = layers[:cut]
        return DetectionParts(trunk=nn.Sequential(*trunk_layers),
                              box_head=nn.Sequential(*layers[cut + 1:], *self.head),
                              out_channels=self._out_channels, stride=self._stride,
                              head_channels=self._head_channels, stages=stages_at_convolutions(trunk_layers))

    def feature_stages(self) -> FeatureStages:
        """One stage per stride of ``features`` and of the convolutions that open ``head`` (LeNet-5's C5),
        last pooling included: the small CNN conv1 (stride 1), conv2 (2), pool2 (4); LeNet-5 conv1 = C1 (6
        channels, 1), conv2 = C3 (16, 2), conv3 = C5 (120, 4); CaffeNet conv1 (96, 4), conv2 (256, 8),
        conv5 (256, 16), pool5 (256, 32); ZFNet conv1 (96, 2), pool1 (96, 4), conv2 (256, 8), conv5 (256, 16),
        pool5 (256, 32). ``avgpool`` (the classifier's fixed grid) is left out."""
        convs = takewhile(lambda m: not isinstance(m, nn.Flatten), self.head)
        return stride_stages([*self.features, *convs])


# ----------------------------------------------------------------------------- small CNN and LeNet-5
# For these small-input networks the detection trunk stops before the last subsampling layer, which
# RoI pooling replaces (as pool5 in Fast R-CNN): stride 2, the deepest stride that leaves a feature map
# larger than the RoI grid the first fully connected layer expects (4x4 or 5x5). Their convolutions are
# unpadded, so the trunk's map is (H - border) / 2, not H / 2.


def _small_cnn_grid(input_side: int) -> int:
    """Side of the small network's last feature map (two unpadded 5x5 convolutions, each then pooled by 2)."""
    return ((input_side - 4) // 2 - 4) // 2


def mnist_cnn(num_classes: int = 10, in_channels: int = 1, input_side: int = 28) -> SequentialBackbone:
    """The notes' small network: conv(5, 32), pool(2), conv(5, 64), pool(2), fc(100), fc(10), ReLU after
    each convolution and the hidden fully connected layer; 28x28x1 MNIST inputs (155,606 parameters).

    ``in_channels=3, input_side=32`` is its CIFAR-10 form (214,806 parameters).
    """
    side = _small_cnn_grid(input_side)
    features = nn.Sequential(nn.Conv2d(in_channels, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    head = _fc_head(64 * side * side, [100], 0.0)
    model = SequentialBackbone(features, head, 100, nn.Linear(100, num_classes), 64, 2,
                               pool=nn.AdaptiveMaxPool2d(side))
    # the notes: "Gaussian initialization sigma = 0.1"
    init_weights(model, conv=normal_init(0.1), linear=normal_init(0.1), bias=0.0)
    return model


def small_cnn_defaults(in_channels: int, input_side: int, **_) -> BackboneDefaults:
    """The small network's defaults follow its input: (in_channels, side, side), mean = std = 0.5, RoIs of
    the last map's side, and no smaller input."""
    return BackboneDefaults(input_size=(in_channels, input_side, input_side), mean=(0.5,) * in_channels,
                            std=(0.5,) * in_channels, roi_output_size=_small_cnn_grid(input_side),
                            min_input_size=input_side)


class ScaledTanh(nn.Module):
    """LeNet-5's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (LeCun et al. 1998, App. A)."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(2.0 / 3.0 * x)


def lenet5(num_classes: int = 10) -> SequentialBackbone:
    """LeNet-5 as the notes' table counts it: conv(5, 6), avg(2), conv(5, 16), avg(2), conv(5, 120),
    fc(84), output(10) on 32x32x1 inputs, 61,706 parameters.

    The notes put the scaled tanh after the subsampling layers and the fully connected layer; C5 gets one
    too, since in the paper every layer up to F6 squashes its weighted sum. Where the paper differs, the
    notes' counts win: the subsampling layers have no trainable coefficient and bias (the table gives them
    0 parameters), C3 sees all six S2 maps (2,416 parameters, not the paper's 1,516 of its sparse
    connection table), and the output is a linear layer of 850 = 10 x (84 + 1) parameters in place of the
    fixed-code Euclidean RBF units.
    """
    features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.AvgPool2d(2), ScaledTanh(),
                             nn.Conv2d(6, 16, 5), nn.AvgPool2d(2), ScaledTanh())
    head = nn.Sequential(nn.Conv2d(16, 120, 5), ScaledTanh(), nn.Flatten(1), nn.Linear(120, 84), ScaledTanh())
    return SequentialBackbone(features, head, 84, nn.Linear(84, num_classes), 16, 2, pool=nn.AdaptiveAvgPool2d(5))


# ----------------------------------------------------------------------------- AlexNet and ZFNet


def alexnet_like(conv1: tuple[int, int, int], widths: tuple[int, int, int, int, int], num_classes: int = 1000,
                 dropout: float = 0.5, lrn: bool = True, ceil: bool = False) -> SequentialBackbone:
    """AlexNet (CaffeNet) and ZFNet: five convolutions (the first ``conv1`` = (kernel, stride, padding), of
    ``widths`` channels), overlapping 3x3/2 max pooling (``ceil``: ceil mode), LRN, fc 4096-4096."""
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
    model = SequentialBackbone(features, head, 4096, nn.Linear(4096, num_classes), w5, 16,
                               pool=nn.AdaptiveMaxPool2d(6))
    # Krizhevsky et al. 2012, Sec. 5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden
    # fully connected layers (positive inputs for the ReLUs early in training), 0 elsewhere.
    init_weights(model, conv=normal_init(0.01), linear=normal_init(0.01), bias=0.0)
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    for m in [convs[1], convs[3], convs[4]] + [m for m in head if isinstance(m, nn.Linear)]:
        nn.init.ones_(m.bias)
    return model


class AlexNetTV(Backbone):
    """torchvision's AlexNet (the "one weird trick" variant, 64-192-384-256-256, no LRN): same names and
    parameter count (61,100,840), so its checkpoints load."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
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
        layers = list(self.features)[:-1]
        return DetectionParts(trunk=nn.Sequential(*layers),
                              box_head=nn.Sequential(nn.Flatten(1), *list(self.classifier)[:-1]),
                              out_channels=256, stride=16, head_channels=4096, stages=stages_at_convolutions(layers))

    def feature_stages(self) -> FeatureStages:
        """``features`` by stride: conv1 (64 channels, stride 4), conv2 (192, 8), conv5 (256, 16), pool5 (256, 32)."""
        return stride_stages(self.features)


# ----------------------------------------------------------------------------- Network in Network, Maxout


def _mlpconv(cin: int, widths: tuple[int, int, int], k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    """One mlpconv layer (Lin et al. 2014, Sec. 3.1): a kxk convolution followed by two 1x1 convolutions
    (the "micro network" shared over positions), ReLU after each."""
    a, b, c = widths
    return [nn.Conv2d(cin, a, k, stride, padding), nn.ReLU(inplace=True), nn.Conv2d(a, b, 1), nn.ReLU(inplace=True),
            nn.Conv2d(b, c, 1), nn.ReLU(inplace=True)]


class NIN(Backbone):
    """Network in Network (Lin et al. 2014): stacked mlpconv layers; the last one produces one feature map
    per class and global average pooling turns the maps into logits (Sec. 3.2), no fully connected layers.

    ``features`` holds the mlpconv layers before the class-map layer with their pooling and dropout;
    ``classifier`` is the class-map mlpconv layer. Detection: RoI pooling replaces the last pooling layer
    of ``features``; the RoI head is the class-map mlpconv layer without its class-specific last 1x1
    convolution, then global average pooling.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, out_channels: int, stride: int):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self._out_channels, self._stride = out_channels, stride
        self._head_channels = [m for m in classifier if isinstance(m, nn.Conv2d)][-2].out_channels
        init_weights(self, conv=kaiming_normal_init("fan_in"), bias=0.0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, num_classes): the average of each class map."""
        return self.flatten(self.gap(self.classifier(self.features(x))))

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)
        cut = _last_pool(layers)
        trunk_layers = layers[:cut]
        pools = [i for i, m in enumerate(trunk_layers) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
        bounds = [0] + [i + 1 for i in pools] + [len(trunk_layers)]
        stages = [nn.Sequential(*trunk_layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        head = nn.Sequential(*layers[cut + 1:], *list(self.classifier)[:-2], self.gap, self.flatten)
        return DetectionParts(trunk=nn.Sequential(*trunk_layers), box_head=head, out_channels=self._out_channels,
                              stride=self._stride, head_channels=self._head_channels, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per mlpconv layer, each with the pooling (and dropout) before it; the class-map layer
        without its class-specific 1x1 convolution is the last: ImageNet mlpconv1 (96 channels, stride 4),
        mlpconv2 (256, 8), mlpconv3 (384, 16), mlpconv4 (1024, 32); CIFAR-10 mlpconv1 (96, 1), mlpconv2
        (192, 2), mlpconv3 (192, 4)."""
        body = [*self.features, *list(self.classifier)[:-2]]
        mlpconvs = sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in body)
        return stride_stages(body, names=[f"mlpconv{i}" for i in range(1, mlpconvs + 1)])


def nin(num_classes: int = 1000, dropout: float = 0.5) -> NIN:
    """The ImageNet NIN (the Caffe model zoo's nin_imagenet, 224x224): mlpconv 96-96-96 (11x11/4),
    256-256-256 (5x5), 384-384-384 (3x3), 1024-1024-classes (3x3), 3x3/2 max pooling between them,
    dropout before the class-map layer. Detection: the trunk ends with the third mlpconv (384 channels,
    stride 16); the RoI head is 1024-1024 and global pooling (1024) on 6x6 RoIs, the grid the class-map
    layer sees on a 224x224 image."""
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    features = nn.Sequential(*_mlpconv(3, (96, 96, 96), 11, 4), pool(), *_mlpconv(96, (256, 256, 256), 5, 1, 2),
                             pool(), *_mlpconv(256, (384, 384, 384), 3, 1, 1), pool(), nn.Dropout(dropout))
    classifier = nn.Sequential(*_mlpconv(384, (1024, 1024, num_classes), 3, 1, 1))
    return NIN(features, classifier, out_channels=384, stride=16)


def nin_cifar(num_classes: int = 10, dropout: float = 0.5) -> NIN:
    """The CIFAR-10 NIN of the paper (Sec. 4.2; the authors' cuda-convnet/Caffe definition): mlpconv
    192-160-96 (5x5), 3x3/2 max pooling, dropout, 192-192-192 (5x5), 3x3/2 average pooling, dropout,
    192-192-classes (3x3), global average pooling; 32x32 inputs. Detection: the trunk ends with the second
    mlpconv (192 channels, stride 2, the deepest before the RoI-pooled layer); RoI head 192-192 and global
    pooling (192) on 8x8 RoIs, the grid the third mlpconv sees on a 32x32 image."""
    features = nn.Sequential(*_mlpconv(3, (192, 160, 96), 5, 1, 2), nn.MaxPool2d(3, 2, ceil_mode=True),
                             nn.Dropout(dropout), *_mlpconv(96, (192, 192, 192), 5, 1, 2),
                             nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(dropout))
    classifier = nn.Sequential(*_mlpconv(192, (192, 192, num_classes), 3, 1, 1))
    return NIN(features, classifier, out_channels=192, stride=2)


class Maxout(nn.Module):
    """Max over ``pieces`` consecutive channels (Goodfellow et al. 2013, Eq. 1):
    (B, C*k, ...) -> (B, C, ...); a fully connected layer's (B, F*k) works the same way."""

    def __init__(self, pieces: int):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        return x.view(b, c // self.pieces, self.pieces, *x.shape[2:]).amax(dim=2)


class MaxoutCNN(Backbone):
    """The CIFAR-10 maxout network of Goodfellow et al. 2013 (Sec. 5.3; the pylearn2 definition): three
    convolutional maxout layers (96, 192, 192 units of 2 pieces; 8x8 pad 4, 8x8 pad 3, 5x5 pad 3 kernels)
    each with max pooling (4x4/2, 4x4/2, 2x2/2), a fully connected maxout layer of 500 units of 5 pieces,
    and the softmax layer; dropout on the input of every layer (0.2 on the image, ``dropout`` elsewhere).

    Detection: RoI pooling replaces the last pooling layer (trunk stride 4, 192 channels, 9x9 on a 32x32
    image); the RoI head is the fully connected maxout layer on 4x4 RoIs.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, input_dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Dropout(input_dropout), nn.Conv2d(3, 96 * 2, 8, padding=4), Maxout(2), nn.MaxPool2d(4, 2, padding=1),
            nn.Dropout(dropout), nn.Conv2d(96, 192 * 2, 8, padding=3), Maxout(2), nn.MaxPool2d(4, 2, padding=1),
            nn.Dropout(dropout), nn.Conv2d(192, 192 * 2, 5, padding=3), Maxout(2), nn.MaxPool2d(2, 2))
        self.pool = nn.AdaptiveMaxPool2d(4)
        self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(dropout), nn.Linear(192 * 16, 500 * 5), Maxout(5))
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(500, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        return self.fc(self.head(self.pool(self.features(x))))

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)[:-1]
        return DetectionParts(trunk=nn.Sequential(*layers), box_head=self.head, out_channels=192, stride=4,
                              head_channels=500, stages=stages_at_convolutions(layers))

    def feature_stages(self) -> FeatureStages:
        """``features`` by stride (dropouts kept where they are): conv1 (96 channels, stride 1), conv2 (192, 2),
        conv3 (192, 4), pool3 (192, 8)."""
        return stride_stages(self.features)


# ----------------------------------------------------------------------------- PReLU-nets


class SpatialPyramidPool(nn.Module):
    """Max pooling into fixed grids of several sizes, concatenated (He et al. 2014, SPP-net):
    (B, C, H, W) -> (B, C * sum(l^2))."""

    def __init__(self, levels: tuple[int, ...] = (7, 3, 2, 1)):
        super().__init__()
        self.levels = tuple(levels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, level).flatten(1) for level in self.levels], dim=1)


class PReLUNet(Backbone):
    """The MSRA PReLU-nets (He et al. 2015, Table 3; the notes' table): 7x7/2 conv of 96, 2x2/2 max pooling,
    then three stages of 3x3 convolutions at 56, 28 and 14 pixels with 2x2/2 max pooling between them
    (``depth`` layers per stage: 5 for model A, 6 for B and C; widths 256/512/512, or 384/768/896 for C),
    a spatial pyramid pooling layer {7, 3, 2, 1} (63 bins) after the last convolution, and fc
    4096-4096-classes with dropout. Every layer but the last is followed by a channel-wise PReLU
    (slopes initialised to 0.25). Weights are drawn with std sqrt(2 / n_l), n_l = k^2 c (the notes' and the
    paper's Eq. 10), biases 0.

    Detection: the trunk is the convolutions up to the 14x14 stage (stride 16); the RoI head is SPP and
    fc1-fc2 on 7x7 RoIs, as SPP-net uses it for detection.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int], num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 96, 7, 2, 3), nn.PReLU(96, 0.25), nn.MaxPool2d(2, 2)]
        cin = 96
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(depth):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.PReLU(w, 0.25)]
                cin = w
        self.features = nn.Sequential(*layers)
        self.spp = SpatialPyramidPool((7, 3, 2, 1))
        bins = 7 * 7 + 3 * 3 + 2 * 2 + 1
        self.classifier = nn.Sequential(nn.Linear(cin * bins, 4096), nn.PReLU(4096, 0.25), nn.Dropout(dropout),
                                        nn.Linear(4096, 4096), nn.PReLU(4096, 0.25), nn.Dropout(dropout),
                                        nn.Linear(4096, num_classes))
        self._out_channels = cin
        he = kaiming_normal_init("fan_in")  # std sqrt(2 / n_l)
        init_weights(self, conv=he, linear=he, bias=0.0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        return self.classifier(self.spp(self.features(x)))

    def detection_parts(self) -> DetectionParts:
        layers = list(self.features)
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        # stem (conv1 + pool), then the 56, 28 and 14 pixel stages.
        bounds = [0, pools[0] + 1, pools[1] + 1, pools[2] + 1, len(layers)]
        stages = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        head = nn.Sequential(self.spp, *list(self.classifier)[:-1])
        return DetectionParts(trunk=self.features, box_head=head, out_channels=self._out_channels, stride=16,
                              head_channels=4096, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """``features`` by stride, each stage from the pooling before it: conv1 (96 channels, stride 2), then
        the 56, 28 and 14 pixel stages (strides 4, 8, 16; widths as given, e.g. model A conv6, conv11,
        conv16 of 256, 512, 512). The network has no stride-32 map (SPP follows)."""
        return stride_stages(self.features)


# ----------------------------------------------------------------------------- the variants

SMALL_CNN, ZF = "reference notes (small CNN)", "Zeiler & Fergus 2014"
NIN_PAPER, PRELU = "Lin et al. 2014", "He et al. 2015"
#: 6x6 RoIs: the grid fc6 (NIN: its class-map layer) sees on a 224x224 image
SIX_AT_224 = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=6, min_input_size=64)
ZF_DEFAULTS = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=6, min_input_size=96)
#: the PReLU-nets: SPP and fc1-fc2 on 7x7 RoIs
PRELU_DEFAULTS = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7, min_input_size=64)
#: the CIFAR-10 networks of NIN and Maxout, on [-1, 1] inputs
SMALL_RGB = dict(input_size=(3, 32, 32), mean=INCEPTION_MEAN, std=INCEPTION_STD, min_input_size=32)
ALEXNET_WIDTHS = (96, 256, 384, 384, 256)
IMAGENET_OPTIONS = dict(num_classes=1000, dropout=0.5)
CIFAR_OPTIONS = dict(num_classes=10, dropout=0.5)

VARIANTS: list[Variant] = [
    Variant("mnist_cnn", mnist_cnn, SMALL_CNN, small_cnn_defaults,
            options=dict(num_classes=10, in_channels=1, input_side=28)),
    Variant("cifar_cnn", mnist_cnn, SMALL_CNN, small_cnn_defaults, args=dict(in_channels=3, input_side=32),
            options=dict(num_classes=10), doc="The notes' small network in its CIFAR-10 column: 32x32x3 inputs."),
    Variant("lenet5", lenet5, "LeCun et al. 1998",
            BackboneDefaults(input_size=(1, 32, 32), mean=(0.5,), std=(0.5,), roi_output_size=5, min_input_size=32),
            options=dict(num_classes=10)),
    Variant("alexnet", alexnet_like, "Krizhevsky et al. 2012 (CaffeNet)",
            BackboneDefaults(input_size=(3, 227, 227), roi_output_size=6, min_input_size=96),
            args=dict(conv1=(11, 4, 0), widths=ALEXNET_WIDTHS), options=IMAGENET_OPTIONS,
            doc="AlexNet as CaffeNet (Krizhevsky et al. 2012; the notes' table): 96-256-384-384-256, LRN, "
                "overlapping 3x3/2 pooling, dropout 0.5, 227x227 inputs, one tower (no grouping), 62,378,344 "
                "parameters."),
    Variant("alexnet_tv", AlexNetTV, "Krizhevsky 2014 (torchvision)", SIX_AT_224, options=IMAGENET_OPTIONS),
    Variant("zfnet", alexnet_like, ZF, ZF_DEFAULTS, args=dict(conv1=(7, 2, 1), widths=ALEXNET_WIDTHS, ceil=True),
            options=IMAGENET_OPTIONS,
            doc="ZFNet (Zeiler & Fergus 2014): AlexNet with a 7x7 stride-2 first layer (and conv2 stride 2)."),
    Variant("zfnet_512_1024_512", alexnet_like, ZF, ZF_DEFAULTS,
            args=dict(conv1=(7, 2, 1), widths=(96, 256, 512, 1024, 512), ceil=True), options=IMAGENET_OPTIONS,
            doc="ZFNet with conv3-5 widened to 512, 1024, 512 (the notes' variant)."),
    Variant("nin", nin, NIN_PAPER, SIX_AT_224, options=IMAGENET_OPTIONS),
    Variant("nin_cifar", nin_cifar, NIN_PAPER, BackboneDefaults(roi_output_size=8, **SMALL_RGB), options=CIFAR_OPTIONS),
    Variant("maxout_cnn", MaxoutCNN, "Goodfellow et al. 2013", BackboneDefaults(roi_output_size=4, **SMALL_RGB),
            options=CIFAR_OPTIONS),
    Variant("prelu_net_a", PReLUNet, PRELU, PRELU_DEFAULTS, args=dict(depth=5, widths=(256, 512, 512)),
            doc="Model A: 19 weight layers (1 + 3 x 5 convolutions + 3 fc), 1.90 x 10^10 multiply-adds at 224."),
    Variant("prelu_net_b", PReLUNet, PRELU, PRELU_DEFAULTS, args=dict(depth=6, widths=(256, 512, 512)),
            doc="Model B: 22 weight layers (1 + 3 x 6 + 3), 2.32 x 10^10 multiply-adds."),
    Variant("prelu_net_c", PReLUNet, PRELU, PRELU_DEFAULTS, args=dict(depth=6, widths=(384, 768, 896)),
            doc="Model C: model B with 384/768/896 filters, 5.30 x 10^10 multiply-adds."),
]
