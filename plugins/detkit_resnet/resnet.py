"""Residual networks and their descendants: one network class, one block class per block kind (their
common signature is :class:`ResidualBlock`'s), and one table of variants (``VARIANTS``).

- ResNet (He et al. 2016a, Sec. 3-4, Table 1): basic blocks (18, 34 layers) and bottlenecks (50, 101,
  152) in four stages conv2_x..conv5_x. Shortcut options (Sec. 3.3 and 4.1): "A" identity, with the new
  channels zero-padded and the map subsampled where dimensions change (parameter-free); "B" projections
  only where dimensions change (the default, and torchvision's); "C" every shortcut a projection. The
  paper's bottleneck has its stride on the first 1x1 convolution (``stride_in_1x1=True``, the default,
  which gives the paper's multiply-add counts); torchvision's checkpoints were trained with the stride on
  the 3x3 ("ResNet v1.5", ``stride_in_1x1=False``): the same parameters, another function. A bottleneck
  network therefore declares ``stride_in_1x1`` as its weights layout (:meth:`ResNet.weights_layout`): the
  ``backbone.pth`` detkit writes records it, a file without a record is taken for torchvision's layout, and
  weights of the other layout are refused with the key to set (``model.backbone.args.stride_in_1x1``, or
  ``model.backbone.weights_layout`` for a file trained in the paper's layout elsewhere).
- Pre-activation ResNet (He et al. 2016b, "Identity Mappings", Fig. 4e): BN-ReLU-conv units with
  nothing after the addition. ImageNet depths follow fb.resnet.torch's preresnet (conv-BN-ReLU-maxpool
  stem, so the first unit skips its own pre-activation; stride on the 3x3). The CIFAR forms ResNet-110
  (basic), -164 and -1001 (bottleneck) have a bare 3x3 conv stem, 16-32-64 widths (x4 at bottleneck
  outputs), the stride on the first 1x1, and 1x1 projection shortcuts without BN.
- Wide ResNet (Zagoruyko & Komodakis 2016): torchvision's wide_resnet50_2/101_2 (bottleneck width
  doubled) and the CIFAR WRN-d-k: (d - 4) / 6 pre-activation basic blocks per stage, widths 16k-32k-64k,
  optional dropout between the two convolutions.
- ResNeXt (Xie et al. 2017): bottlenecks whose 3x3 is a grouped convolution of cardinality C with d
  channels per group ("32x4d"); stride on the 3x3 as in the authors' code.
- SE-ResNet / SE-ResNeXt (Hu et al. 2018, Fig. 3): squeeze-and-excitation (reduction r = 16) on each
  residual branch before the addition. SE-ResNet keeps the stride on the 1x1 (the authors' Caffe
  models), SE-ResNeXt on the 3x3.
- Stochastic depth (Huang et al. 2016, Sec. 3), an option of every variant: ``stochastic_depth=p_L``
  gives block l of L the survival probability p_l = 1 - l/L (1 - p_L) (the linear decay rule; p_0 = 1
  is the input). In training a block's residual branch is kept for the whole mini-batch with probability
  p_l and otherwise skipped (only the shortcut remains); at test time the branch is scaled by p_l.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1``.., ``fc``), so its checkpoints load.
Detection (ResNet paper, Appendix A; Detectron's C4): the trunk is conv1..conv4_x (stride 16) and the RoI
head conv5_x plus global average pooling on 14x14 pooled regions. The CIFAR forms have only three
stages; their trunk is the whole convolutional part (stride 4, the deepest map) and the RoI head the
final BN-ReLU and global average pooling. For necks (Feature Pyramid Networks read C2..C5),
``feature_stages`` exposes the stem and every stage, res5 included, with their channels and strides.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import (CIFAR_DEFAULTS, Backbone, BackboneDefaults, DetectionParts, FeatureInfo,
                              FeatureStages, Variant, init_weights, kaiming_normal_init)

SHORTCUTS = ("A", "B", "C")
PAPER_SURVIVAL = 0.5  # Huang et al. 2016, Sec. 4: p_L = 0.5 throughout


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s)); subsample, zero-pad new channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"zero-padding shortcut cannot reduce channels ({cin} -> {cout}); use shortcut 'B'")
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class SqueezeExcitation(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): global pool -> fc(C/r) -> ReLU -> fc(C) -> sigmoid -> per-channel scale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * gate[:, :, None, None]


class ResidualBlock(nn.Module):
    """y = shortcut(x) + F(x), then ReLU (original unit) or nothing (pre-activation unit).

    This class owns the signature every block kind shares, the shortcut (``downsample``, torchvision's
    name), the optional squeeze-and-excitation on F and stochastic depth; a subclass builds the branch F
    in ``make_branch`` and runs it in ``branch``. Pre-activation units apply ``bn0``-ReLU first; where the
    shortcut is a projection it sees that activated input too (He et al. 2016b, Sec. 4.1 and their code).

    inplanes: input channels; planes: the branch's width (output channels ``planes * expansion``);
    stride: of the branch's strided convolution (the 1x1 with ``stride_in_1x1``, else the 3x3);
    groups, base_width: ResNeXt's cardinality and width per group (64: a plain ResNet); se_reduction:
    squeeze-and-excitation ratio r (None: no SE); survival: stochastic depth's p_l; dropout: between the
    convolutions of a pre-activation basic unit (WRN); preactivate: False for a first unit that follows
    an already activated stem.
    """

    expansion = 1
    preact = False
    grouped = True  # whether the branch takes groups / base_width (basic units do not)
    bottleneck = False  # a 1x1-3x3-1x1 branch, whose stride ``stride_in_1x1`` places (a basic unit has one place)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 stride_in_1x1: bool = True, groups: int = 1, base_width: int = 64, se_reduction: int | None = None,
                 survival: float = 1.0, dropout: float = 0.0, preactivate: bool = True):
        if not self.grouped and (groups != 1 or base_width != 64):
            raise ValueError(f"{type(self).__name__} supports only groups=1 and width_per_group=64, "
                             f"got {groups} and {base_width}")
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes) if self.preact and preactivate else None
        self.downsample = downsample
        self.se = SqueezeExcitation(planes * self.expansion, se_reduction) if se_reduction else None
        self.survival = survival
        self.make_branch(inplanes, planes, stride, stride_in_1x1, groups, base_width, dropout)

    def make_branch(self, inplanes: int, planes: int, stride: int, stride_in_1x1: bool, groups: int,
                    base_width: int, dropout: float) -> None:
        raise NotImplementedError

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def residual(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return self.se(out) if self.se is not None else out

    def forward(self, x: Tensor) -> Tensor:
        shortcut_in = x
        if self.bn0 is not None:
            x = F.relu(self.bn0(x))
            if self.downsample is not None:
                shortcut_in = x
        identity = shortcut_in if self.downsample is None else self.downsample(shortcut_in)
        if self.survival >= 1.0:
            out = identity + self.residual(x)
        elif self.training:
            # One Bernoulli draw per mini-batch: the whole block is kept or skipped (Huang et al., Sec. 3).
            if float(torch.rand(())) >= self.survival:
                out = identity
            else:
                out = identity + self.residual(x)
        else:
            out = identity + self.survival * self.residual(x)
        return out if self.preact else F.relu(out)


def _bottleneck_convs(block: ResidualBlock, inplanes: int, planes: int, stride: int, stride_in_1x1: bool,
                      groups: int, base_width: int) -> None:
    """conv1 1x1 - bn1 - conv2 3x3 (groups) - bn2 - conv3 1x1 (x expansion), the layers both bottlenecks share."""
    width = int(planes * (base_width / 64.0)) * groups
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    block.conv1 = conv1x1(inplanes, width, s1)
    block.bn1 = nn.BatchNorm2d(width)
    block.conv2 = conv3x3(width, width, s3, groups)
    block.bn2 = nn.BatchNorm2d(width)
    block.conv3 = conv1x1(width, planes * block.expansion)


class BasicBlock(ResidualBlock):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN (He et al. 2016a, Fig. 5 left)."""

    grouped = False

    def make_branch(self, inplanes, planes, stride, stride_in_1x1, groups, base_width, dropout) -> None:
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """conv1x1-BN-ReLU-conv3x3(groups)-BN-ReLU-conv1x1(x4)-BN (He et al. 2016a, Fig. 5 right; Xie et al.)."""

    expansion = 4
    bottleneck = True

    def make_branch(self, inplanes, planes, stride, stride_in_1x1, groups, base_width, dropout) -> None:
        _bottleneck_convs(self, inplanes, planes, stride, stride_in_1x1, groups, base_width)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PreActBasicBlock(ResidualBlock):
    """[BN-ReLU]-conv3x3(stride)-BN-ReLU-(dropout)-conv3x3 (He et al. 2016b Fig. 4e; WRN's block with dropout)."""

    preact = True
    grouped = False

    def make_branch(self, inplanes, planes, stride, stride_in_1x1, groups, base_width, dropout) -> None:
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = conv3x3(planes, planes)

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(self.dropout(out) if self.dropout is not None else out)


class PreActBottleneck(ResidualBlock):
    """[BN-ReLU]-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4) (He et al. 2016b, Fig. 4e)."""

    preact = True
    expansion = 4
    bottleneck = True

    def make_branch(self, inplanes, planes, stride, stride_in_1x1, groups, base_width, dropout) -> None:
        _bottleneck_convs(self, inplanes, planes, stride, stride_in_1x1, groups, base_width)

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(out))))


def linear_survival(num_blocks: int, p_last: float) -> list[float]:
    """Huang et al. 2016, Eq. 4: p_l = 1 - l/L (1 - p_L) for blocks l = 1..L."""
    return [1.0 - (i + 1) / num_blocks * (1.0 - p_last) for i in range(num_blocks)]


def _survival_argument(stochastic_depth: float | bool) -> float:
    """``True`` means the paper's p_L = 0.5, ``False`` or 1.0 means off."""
    if stochastic_depth is True:
        return PAPER_SURVIVAL
    if stochastic_depth is False:
        return 1.0
    if not isinstance(stochastic_depth, (int, float)) or not 0.0 < stochastic_depth <= 1.0:
        raise ValueError(f"stochastic_depth={stochastic_depth!r}: expected the last block's survival probability "
                         "p_L in (0, 1] (1.0 = off, the paper uses 0.5) or True/False")
    return float(stochastic_depth)


class ResNet(Backbone):
    """Residual network: ImageNet form (7x7/2 stem, 3x3/2 max pool, four stages, stride 32) or, with
    ``cifar=True``, the CIFAR form (3x3 stem of ``stem_width`` channels, three stages, stride 4).

    forward: images (B, 3, H, W) -> logits (B, num_classes).
    """

    def __init__(self, block: type[ResidualBlock], layers: list[int], num_classes: int = 1000, *,
                 stride_in_1x1: bool = True, shortcut: str = "B", groups: int = 1, width_per_group: int = 64,
                 se_reduction: int | None = None, stochastic_depth: float | bool = 1.0, cifar: bool = False,
                 widths: tuple[int, ...] = (64, 128, 256, 512), stem_width: int = 64, dropout: float = 0.0):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r}: expected one of {SHORTCUTS}")
        if len(layers) != len(widths) or len(layers) < 3 or any(n < 1 for n in layers):
            raise ValueError(f"layers={layers}: expected {len(widths)} positive block counts (one per stage)")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}: expected a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: expected a probability in [0, 1)")
        p_last = _survival_argument(stochastic_depth)
        self.cifar = cifar
        self.stride_in_1x1 = stride_in_1x1 if block.bottleneck else None  # a basic unit has no choice
        self.preact = block.preact
        self.inplanes = stem_width
        # the stem: a bare 3x3 convolution (CIFAR), else a 7x7/2 one followed by a 3x3/2 max pool (stride 4)
        kernel, stride, padding = (3, 1, 1) if cifar else (7, 2, 3)
        self.conv1 = nn.Conv2d(3, stem_width, kernel, stride, padding, bias=False)
        # A pre-activation CIFAR net's first unit activates the bare stem output itself (He et al. 2016b's
        # and WRN's code); every other form normalises and activates the stem.
        stem_activated = not (cifar and self.preact)
        self.bn1 = nn.BatchNorm2d(stem_width) if stem_activated else None
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = None if cifar else nn.MaxPool2d(3, 2, 1)
        survival = iter(linear_survival(sum(layers), p_last))
        opts = dict(stride_in_1x1=stride_in_1x1, groups=groups, base_width=width_per_group,
                    se_reduction=se_reduction, dropout=dropout)
        self.stage_names, self.stage_channels = [], []
        for i, (width, n) in enumerate(zip(widths, layers)):
            name = f"layer{i + 1}"
            # The first unit after an activated stem must not pre-activate again (fb.resnet.torch preresnet).
            first_preactivates = not (i == 0 and stem_activated)
            stage = self._make_layer(block, width, n, 1 if i == 0 else 2, shortcut, survival, first_preactivates,
                                     opts)
            setattr(self, name, stage)
            self.stage_names.append(name)
            self.stage_channels.append(width * block.expansion)
        final = self.stage_channels[-1]
        self.bn_final = nn.BatchNorm2d(final) if self.preact else None  # the last unit ends without BN-ReLU
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(final, num_classes)
        init_weights(self, conv=kaiming_normal_init("fan_out"))  # He et al. 2015

    def _make_layer(self, block: type[ResidualBlock], planes: int, blocks: int, stride: int, shortcut: str,
                    survival: Iterator[float], first_preactivates: bool, opts: dict) -> nn.Sequential:
        out = planes * block.expansion
        units = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = None
            if shortcut == "C" or s != 1 or self.inplanes != out:
                if shortcut == "A":
                    downsample = ZeroPadShortcut(self.inplanes, out, s)
                elif block.preact:  # He et al. 2016b: a bare 1x1 projection, the sum is never normalised
                    downsample = conv1x1(self.inplanes, out, s)
                else:
                    downsample = nn.Sequential(conv1x1(self.inplanes, out, s), nn.BatchNorm2d(out))
            units.append(block(self.inplanes, planes, s, downsample, survival=next(survival),
                               preactivate=first_preactivates or i > 0, **opts))
            self.inplanes = out
        return nn.Sequential(*units)

    def weights_layout(self) -> dict[str, bool]:
        """``{"stride_in_1x1": ...}`` for bottleneck networks: the two places of the stride take the same
        parameters and compute different functions. ``{}`` for basic blocks (the stride has one place)."""
        return {} if self.stride_in_1x1 is None else {"stride_in_1x1": self.stride_in_1x1}

    def assumed_weights_layout(self) -> tuple[dict[str, bool], str] | None:
        """A bottleneck file without detkit's record, in torchvision's naming, is torchvision's: its ResNet,
        ResNeXt and Wide ResNet checkpoints have the stride on the 3x3 (torchvision's docs: "ResNet V1.5").
        The CIFAR forms have no such checkpoints to assume anything of."""
        if self.stride_in_1x1 is None or self.cifar:
            return None
        return {"stride_in_1x1": False}, "torchvision's"

    def describe_weights_layout(self, layout) -> str:
        where = {True: "the stride on the first 1x1 convolution", False: "the stride on the 3x3 convolution"}
        return ", ".join(f"{k}={v!r}" + (f" ({where[v]})" if k == "stride_in_1x1" and v in where else "")
                         for k, v in layout.items())

    def blocks(self) -> list[ResidualBlock]:
        """All residual units, input to output (their ``survival`` is the stochastic-depth p_l)."""
        return [m for m in self.modules() if isinstance(m, ResidualBlock)]

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def _stem(self) -> nn.Sequential:
        layers = [self.conv1]
        if self.bn1 is not None:
            layers += [self.bn1, self.relu]
        if self.maxpool is not None:
            layers.append(self.maxpool)
        return nn.Sequential(*layers)

    def _final_activation(self) -> list[nn.Module]:
        """A pre-activation net's BN-ReLU after its last unit (none for post-activation units)."""
        return [self.bn_final, nn.ReLU()] if self.bn_final is not None else []

    def _post(self) -> list[nn.Module]:
        """Layers after the last stage, up to the classifier: (B, C, h, w) -> (B, C)."""
        return self._final_activation() + [self.avgpool, nn.Flatten(1)]

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem()(x)
        for stage in self._stages():
            x = stage(x)
        for layer in self._post():
            x = layer(x)
        return self.fc(x)

    def detection_parts(self) -> DetectionParts:
        """C4 cut: trunk = stem + three stages (stride 16; the CIFAR forms' whole body, stride 4)."""
        stages = [self._stem(), *self._stages()[:3]]
        rest = self._stages()[3:]
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=nn.Sequential(*rest, *self._post()),
                              out_channels=self.stage_channels[2], stride=4 if self.cifar else 16,
                              head_channels=self.stage_channels[-1], stages=stages)

    def feature_stages(self) -> FeatureStages:
        """The stem and every stage, applied in turn to images (B, 3, H, W), each output a feature map:

        - ImageNet forms: "stem" (conv1-BN-ReLU-max pool, ``stem_width`` channels, stride 4), then
          "res2".."res5" (``layer1``..``layer4``; strides 4, 8, 16, 32; 64-128-256-512 channels with basic
          blocks, 256-512-1024-2048 with bottlenecks): C2..C5 of a Feature Pyramid Network. res5 is the C4
          cut's RoI head, here a feature stage.
        - CIFAR forms: "stem" (the 3x3 conv, bare in the pre-activation forms; 16 channels, stride 1), then
          "res2".."res4" (``layer1``..``layer3``; strides 1, 2, 4; ``widths`` times the block's expansion).

        The stages are the classifier's own modules (no copies); global pooling and ``fc`` are left out.
        """
        stages = [self._stem(), *self._stages()]
        final = self._final_activation()
        if final:
            # A pre-activation unit ends at its addition (He et al. 2016b, Fig. 4e): each stage's output is
            # normalised and activated by the next unit's own BN-ReLU, the last stage's only by this final
            # BN-ReLU before pooling. It belongs to the last stage, so that the deepest map is the activated one
            # the classifier pools, as a post-activation ResNet's last stage ends activated too.
            stages[-1] = nn.Sequential(stages[-1], *final)
        stem_stride = 1 if self.cifar else 4
        names = ["stem"] + [f"res{i + 2}" for i in range(len(self.stage_names))]
        channels = [self.conv1.out_channels, *self.stage_channels]
        strides = [stem_stride] + [stem_stride * 2 ** i for i in range(len(self.stage_names))]
        return FeatureStages(stages, [FeatureInfo(*row) for row in zip(names, channels, strides)])


# ----------------------------------------------------------------------------- the variants

HE = "He et al. 2016 (deep residual learning)"
PREACT = "He et al. 2016 (identity mappings)"
WRN = "Zagoruyko & Komodakis 2016"
RESNEXT = "Xie et al. 2017"
SE_NET = "Hu et al. 2018"

#: ImageNet forms: 224x224 inputs; C4 cut on 14x14 RoIs, which res5 halves to the 7x7 of the classifier.
#: (CIFAR forms: CIFAR_DEFAULTS, whose 8x8 RoIs are the map the classifier pools at 32x32.)
IMAGENET_C4 = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=14, min_input_size=32)


def imagenet(name: str, paper: str, doc: str, block: type[ResidualBlock], layers: list[int],
             stride_in_1x1: bool = True, **fixed) -> Variant:
    """An ImageNet form: four stages of ``layers`` blocks; ``fixed``: groups, width_per_group, se_reduction."""
    return Variant(name, ResNet, paper, IMAGENET_C4, args=dict(block=block, layers=layers, **fixed),
                   options=dict(num_classes=1000, stride_in_1x1=stride_in_1x1, shortcut="B", stochastic_depth=1.0),
                   doc=doc)


def cifar(name: str, paper: str, doc: str, block: type[ResidualBlock], n: int,
          widths: tuple[int, int, int]) -> Variant:
    """A CIFAR form: 3x3 stem of 16 channels, three stages of ``n`` blocks of ``widths``, stride on the 1x1."""
    return Variant(name, ResNet, paper, CIFAR_DEFAULTS,
                   args=dict(block=block, layers=[n, n, n], stride_in_1x1=True, cifar=True, widths=widths,
                             stem_width=16),
                   options=dict(num_classes=10, shortcut="B", stochastic_depth=1.0, dropout=0.0), doc=doc)


def wide_resnet_cifar(depth: int, k: int) -> Variant:
    """WRN-d-k (Zagoruyko & Komodakis 2016, Table 1), registered as ``wrn{d}_{k}``: (d - 4) / 6
    pre-activation basic blocks per stage, widths 16k, 32k, 64k; its ``dropout`` sits between the two 3x3
    convolutions. The row is its builder: ``wide_resnet_cifar(16, 8)()`` builds WRN-16-8."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth {depth}: expected 6n + 4 with n >= 1 (e.g. 16, 28, 40)")
    if k < 1:
        raise ValueError(f"WRN widening factor {k}: expected a positive integer")
    return cifar(f"wrn{depth}_{k}", WRN, f"WRN-{depth}-{k} for 32x32 inputs.", PreActBasicBlock, (depth - 4) // 6,
                 (16 * k, 32 * k, 64 * k))


B, BN, PB, PBN = BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
SE = dict(se_reduction=16)
VARIANTS: list[Variant] = [
    imagenet("resnet18", HE, "ResNet-18 (basic blocks 2-2-2-2).", B, [2, 2, 2, 2]),
    imagenet("resnet34", HE, "ResNet-34 (basic blocks 3-4-6-3).", B, [3, 4, 6, 3]),
    imagenet("resnet50", HE, "ResNet-50 (bottlenecks 3-4-6-3).", BN, [3, 4, 6, 3]),
    imagenet("resnet101", HE, "ResNet-101 (bottlenecks 3-4-23-3).", BN, [3, 4, 23, 3]),
    imagenet("resnet152", HE, "ResNet-152 (bottlenecks 3-8-36-3).", BN, [3, 8, 36, 3]),
    imagenet("preact_resnet18", PREACT, "Pre-activation ResNet-18.", PB, [2, 2, 2, 2], False),
    imagenet("preact_resnet34", PREACT, "Pre-activation ResNet-34.", PB, [3, 4, 6, 3], False),
    imagenet("preact_resnet50", PREACT, "Pre-activation ResNet-50.", PBN, [3, 4, 6, 3], False),
    imagenet("preact_resnet101", PREACT, "Pre-activation ResNet-101.", PBN, [3, 4, 23, 3], False),
    imagenet("preact_resnet152", PREACT, "Pre-activation ResNet-152.", PBN, [3, 8, 36, 3], False),
    cifar("preact_resnet110", PREACT, "Pre-activation ResNet-110 for CIFAR (18 basic units per stage).",
          PB, 18, (16, 32, 64)),
    cifar("preact_resnet164", PREACT, "Pre-activation ResNet-164 for CIFAR (18 bottlenecks per stage).",
          PBN, 18, (16, 32, 64)),
    cifar("preact_resnet1001", PREACT, "Pre-activation ResNet-1001 for CIFAR (111 bottlenecks per stage).",
          PBN, 111, (16, 32, 64)),
    imagenet("wide_resnet50_2", WRN, "Wide ResNet-50-2 (bottleneck width x2).", BN, [3, 4, 6, 3], False,
             width_per_group=128),
    imagenet("wide_resnet101_2", WRN, "Wide ResNet-101-2 (bottleneck width x2).", BN, [3, 4, 23, 3], False,
             width_per_group=128),
    wide_resnet_cifar(28, 10),
    wide_resnet_cifar(40, 4),
    imagenet("resnext50_32x4d", RESNEXT, "ResNeXt-50 (32x4d).", BN, [3, 4, 6, 3], False, groups=32,
             width_per_group=4),
    imagenet("resnext101_32x8d", RESNEXT, "ResNeXt-101 (32x8d).", BN, [3, 4, 23, 3], False, groups=32,
             width_per_group=8),
    imagenet("resnext101_64x4d", RESNEXT, "ResNeXt-101 (64x4d).", BN, [3, 4, 23, 3], False, groups=64,
             width_per_group=4),
    imagenet("se_resnet18", SE_NET, "SE-ResNet-18.", B, [2, 2, 2, 2], **SE),
    imagenet("se_resnet34", SE_NET, "SE-ResNet-34.", B, [3, 4, 6, 3], **SE),
    imagenet("se_resnet50", SE_NET, "SE-ResNet-50.", BN, [3, 4, 6, 3], **SE),
    imagenet("se_resnet101", SE_NET, "SE-ResNet-101.", BN, [3, 4, 23, 3], **SE),
    imagenet("se_resnet152", SE_NET, "SE-ResNet-152.", BN, [3, 8, 36, 3], **SE),
    imagenet("se_resnext50_32x4d", SE_NET, "SE-ResNeXt-50 (32x4d).", BN, [3, 4, 6, 3], False, groups=32,
             width_per_group=4, **SE),
    imagenet("se_resnext101_32x4d", SE_NET, "SE-ResNeXt-101 (32x4d).", BN, [3, 4, 23, 3], False, groups=32,
             width_per_group=4, **SE),
]
