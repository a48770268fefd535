"""Residual networks and their descendants, one class per block kind.

- ResNet (He et al. 2016a, Table 1): basic blocks (18, 34) and bottlenecks (50, 101, 152), in four
  stages conv2_x..conv5_x. Shortcut options (Sec. 4.1): "A" identity with zero-padded extra channels
  (parameter-free), "B" projections only where dimensions change (default, = torchvision), "C" every
  shortcut a projection. The paper's bottleneck puts the stride on the first 1x1 convolution
  (``stride_in_1x1=True``, the default, giving the paper's FLOPs); torchvision's checkpoints were trained
  with it on the 3x3 ("v1.5", ``stride_in_1x1=False``): same parameters, another function.
- Pre-activation ResNet (He et al. 2016b): BN-ReLU-conv ordering, ImageNet depths and the CIFAR forms
  ResNet-110 (basic), -164 and -1001 (bottleneck).
- Wide ResNet (Zagoruyko & Komodakis 2016): torchvision's wide_resnet50_2/101_2 and the CIFAR WRN-d-k
  (pre-activation basic blocks, widths 16k-32k-64k, dropout between the convolutions).
- ResNeXt (Xie et al. 2017): grouped 3x3 convolutions of cardinality C and width d per group.
- SE-ResNet / SE-ResNeXt (Hu et al. 2018): squeeze-and-excitation (reduction 16) on each residual branch.
- Stochastic depth (Huang et al. 2016), an option of every variant: ``stochastic_depth=p_L`` gives block l
  of L the survival probability p_l = 1 - l/L (1 - p_L); in training a block's residual branch is dropped
  for the whole mini-batch with probability 1 - p_l, at test time it is scaled by p_l.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1``.., ``fc``), so its checkpoints load.
Detection (ResNet paper, Appendix A; Detectron C4): the trunk is conv1..conv4_x (stride 16), the RoI
head conv5_x and global average pooling on 14x14 pooled features. CIFAR forms cut before their last
stage (stride 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and pad the new channels with zeros (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class SqueezeExcitation(nn.Module):
    """Channel gating: global pool -> fc(C/r) -> ReLU -> fc(C) -> sigmoid -> scale (Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class ResidualBlock(nn.Module):
    """Shared shortcut/SE/stochastic-depth handling; subclasses define ``branch(x)``."""

    expansion = 1
    preact = False

    def __init__(self, downsample: nn.Module | None, out_channels: int, se_reduction: int | None,
                 survival: float):
        super().__init__()
        self.downsample = downsample
        self.se = SqueezeExcitation(out_channels, se_reduction) if se_reduction else None
        self.survival = survival

    def residual(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return self.se(out) if self.se is not None else out

    def forward(self, x: Tensor) -> Tensor:
        shortcut_in = x
        if self.preact:
            x = F.relu(self.bn0(x))
            if self.downsample is not None:  # projections see the pre-activated input (He et al. 2016b)
                shortcut_in = x
        identity = shortcut_in if self.downsample is None else self.downsample(shortcut_in)
        if self.survival < 1.0:
            if self.training:
                if float(torch.rand(())) >= self.survival:  # dropped for the whole mini-batch
                    return identity if self.preact else F.relu(identity)
                out = identity + self.residual(x)
            else:
                out = identity + self.survival * self.residual(x)
        else:
            out = identity + self.residual(x)
        return out if self.preact else F.relu(out)


class BasicBlock(ResidualBlock):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, stride_in_1x1: bool = True,
                 groups: int = 1, base_width: int = 64, se_reduction: int | None = None, survival: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(downsample, planes, se_reduction, survival)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, stride_in_1x1: bool = True,
                 groups: int = 1, base_width: int = 64, se_reduction: int | None = None, survival: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(downsample, planes * self.expansion, se_reduction, survival)
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PreActBasicBlock(ResidualBlock):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 (He et al. 2016b; WRN's block with dropout)."""

    preact = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, stride_in_1x1: bool = True,
                 groups: int = 1, base_width: int = 64, se_reduction: int | None = None, survival: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(downsample, planes, se_reduction, survival)
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes)

    def branch(self, x: Tensor) -> Tensor:
        return self.conv2(self.dropout(F.relu(self.bn1(self.conv1(x)))))


class PreActBottleneck(ResidualBlock):
    preact = True
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, stride_in_1x1: bool = True,
                 groups: int = 1, base_width: int = 64, se_reduction: int | None = None, survival: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(downsample, planes * self.expansion, se_reduction, survival)
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(out))))


class ResNet(Backbone):
    """ImageNet-style residual network (7x7 stem, four stages) or, with ``cifar=True``, the CIFAR form
    (3x3 stem of ``stem_width`` channels, three stages)."""

    def __init__(self, block: type[ResidualBlock], layers: list[int], num_classes: int = 1000,
                 stride_in_1x1: bool = True, shortcut: str = "B", groups: int = 1, width_per_group: int = 64,
                 se_reduction: int | None = None, stochastic_depth: float = 1.0, cifar: bool = False,
                 widths: tuple[int, ...] = (64, 128, 256, 512), stem_width: int = 64, dropout: float = 0.0):
        super().__init__()
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"shortcut={shortcut!r}: expected 'A', 'B' or 'C'")
        if not 0 < stochastic_depth <= 1:
            raise ValueError(f"stochastic_depth={stochastic_depth}: expected a survival probability in (0, 1]")
        self.preact = block.preact
        self.cifar = cifar
        self.inplanes = stem_width
        if cifar:
            self.defaults = BackboneDefaults(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD,
                                             roi_output_size=8, min_input_size=32)
            self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        else:
            self.defaults = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=14, min_input_size=32)
            self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)  # pre-activation nets: the BN-ReLU after the stem (fb.resnet.torch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        total = sum(layers)
        survival = iter([1.0 - (i + 1) / total * (1.0 - stochastic_depth) for i in range(total)])
        opts = dict(stride_in_1x1=stride_in_1x1, groups=groups, base_width=width_per_group,
                    se_reduction=se_reduction, dropout=dropout)
        self.stage_names, self.stage_channels = [], []
        for i, (width, n) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, width, n, stride, shortcut, survival, opts))
            self.stage_names.append(f"layer{i + 1}")
            self.stage_channels.append(width * block.expansion)
        final = widths[-1] * block.expansion
        self.bn_final = nn.BatchNorm2d(final) if self.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(final, num_classes)
        self.final_channels = final
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, shortcut: str, survival, opts):
        out = planes * block.expansion
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = None
            if shortcut == "C" or s != 1 or self.inplanes != out:
                if shortcut == "A" and self.inplanes <= out:
                    downsample = ZeroPadShortcut(self.inplanes, out, s)
                elif block.preact:
                    downsample = conv1x1(self.inplanes, out, s)
                else:
                    downsample = nn.Sequential(conv1x1(self.inplanes, out, s), nn.BatchNorm2d(out))
            layers.append(block(self.inplanes, planes, s, downsample, survival=next(survival), **opts))
            self.inplanes = out
        return nn.Sequential(*layers)

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def _post(self) -> list[nn.Module]:
        """Layers after the last stage, before the classifier."""
        post = [self.bn_final, nn.ReLU()] if self.bn_final is not None else []
        return post + [self.avgpool, nn.Flatten(1)]

    def _stem(self) -> nn.Module:
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem()(x)
        for stage in self._stages():
            x = stage(x)
        for layer in self._post():
            x = layer(x)
        return self.fc(x)

    def detection_parts(self) -> DetectionParts:
        stages = [self._stem(), *self._stages()[:-1]]
        last = self._stages()[-1]
        return DetectionParts(trunk=nn.Sequential(*stages), roi_head=nn.Sequential(last, *self._post()),
                              out_channels=self.stage_channels[-2], stride=2 if self.cifar else 16,
                              head_channels=self.final_channels, stages=stages)


def _imagenet(block, layers, **fixed):
    def build(num_classes: int = 1000, stride_in_1x1: bool = True, shortcut: str = "B",
              stochastic_depth: float = 1.0) -> ResNet:
        return ResNet(block, layers, num_classes, stride_in_1x1, shortcut, stochastic_depth=stochastic_depth,
                      **fixed)

    return build


def _cifar(block, n: int, widths: tuple[int, int, int], stem: int = 16):
    def build(num_classes: int = 10, shortcut: str = "B", stochastic_depth: float = 1.0,
              dropout: float = 0.0) -> ResNet:
        return ResNet(block, [n, n, n], num_classes, True, shortcut, stochastic_depth=stochastic_depth,
                      cifar=True, widths=widths, stem_width=stem, dropout=dropout)

    return build


def wide_resnet_cifar(depth: int, k: int):
    """WRN-d-k (Zagoruyko & Komodakis 2016): n = (d - 4) / 6 pre-activation basic blocks per stage."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth {depth}: expected 6n + 4")
    return _cifar(PreActBasicBlock, (depth - 4) // 6, (16 * k, 32 * k, 64 * k))


B, BN = BasicBlock, Bottleneck
VARIANTS = {
    "resnet18": _imagenet(B, [2, 2, 2, 2]), "resnet34": _imagenet(B, [3, 4, 6, 3]),
    "resnet50": _imagenet(BN, [3, 4, 6, 3]), "resnet101": _imagenet(BN, [3, 4, 23, 3]),
    "resnet152": _imagenet(BN, [3, 8, 36, 3]),
    "preact_resnet18": _imagenet(PreActBasicBlock, [2, 2, 2, 2]),
    "preact_resnet34": _imagenet(PreActBasicBlock, [3, 4, 6, 3]),
    "preact_resnet50": _imagenet(PreActBottleneck, [3, 4, 6, 3]),
    "preact_resnet101": _imagenet(PreActBottleneck, [3, 4, 23, 3]),
    "preact_resnet152": _imagenet(PreActBottleneck, [3, 8, 36, 3]),
    "preact_resnet110": _cifar(PreActBasicBlock, 18, (16, 32, 64)),
    "preact_resnet164": _cifar(PreActBottleneck, 18, (16, 32, 64)),
    "preact_resnet1001": _cifar(PreActBottleneck, 111, (16, 32, 64)),
    "wide_resnet50_2": _imagenet(BN, [3, 4, 6, 3], width_per_group=128),
    "wide_resnet101_2": _imagenet(BN, [3, 4, 23, 3], width_per_group=128),
    "wrn28_10": wide_resnet_cifar(28, 10), "wrn40_4": wide_resnet_cifar(40, 4),
    "resnext50_32x4d": _imagenet(BN, [3, 4, 6, 3], groups=32, width_per_group=4),
    "resnext101_32x8d": _imagenet(BN, [3, 4, 23, 3], groups=32, width_per_group=8),
    "resnext101_64x4d": _imagenet(BN, [3, 4, 23, 3], groups=64, width_per_group=4),
    "se_resnet18": _imagenet(B, [2, 2, 2, 2], se_reduction=16),
    "se_resnet34": _imagenet(B, [3, 4, 6, 3], se_reduction=16),
    "se_resnet50": _imagenet(BN, [3, 4, 6, 3], se_reduction=16),
    "se_resnet101": _imagenet(BN, [3, 4, 23, 3], se_reduction=16),
    "se_resnet152": _imagenet(BN, [3, 8, 36, 3], se_reduction=16),
    "se_resnext50_32x4d": _imagenet(BN, [3, 4, 6, 3], groups=32, width_per_group=4, se_reduction=16),
    "se_resnext101_32x4d": _imagenet(BN, [3, 4, 23, 3], groups=32, width_per_group=4, se_reduction=16),
}
