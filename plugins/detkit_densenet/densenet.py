"""Densely connected networks (Huang et al. 2017, Sec. 3 and Table 1).

Every layer of a dense block receives the concatenation of all earlier feature maps of the block and adds
``growth_rate`` (k) maps; DenseNet-BC layers are bottlenecks (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to
k) and transitions compress by 0.5 (BN-ReLU-1x1 conv, 2x2 average pooling). DenseNet-121/169/201 (k = 32)
and -161 (k = 48) have torchvision's structure and parameter names (old checkpoints with ``norm.1``-style
keys are remapped on loading); ``densenet_bc_100_12`` is the CIFAR DenseNet-BC (L = 100, k = 12, 0.8M
parameters, Table 2). ``memory_efficient=True`` recomputes each layer's concatenation and bottleneck in the
backward pass instead of storing them (Pleiss et al. 2017, as torchvision's option).

Detection cut (the analogue of ResNet's C4): the trunk is the stem, dense blocks 1-3 with transitions 1-2,
and the BN-ReLU-1x1 convolution of transition 3 without its pooling: stride 16, channels 512 / 640 / 896 /
1056 for DenseNet-121 / 169 / 201 / 161. The RoI head is the rest up to the classifier: transition 3's
2x2 average pooling, dense block 4, the final BN, ReLU and global average pooling, giving 1024 / 1664 /
1920 / 2208 channels. RoIs are pooled to 14x14 so that, after the transition's pooling, dense block 4
works on 7x7 maps as in the 224x224 classifier (as ResNet-C4's 14x14 RoIs become 7x7 in res5). The CIFAR
form is cut the same way before its last block: stride 2 (150 channels), RoI head -> 342 channels, 8x8 RoIs.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from detkit.backbones import (CIFAR_DEFAULTS, Backbone, BackboneDefaults, DetectionParts, FeatureInfo, FeatureStages,
                              Variant, init_weights, kaiming_normal_init)


class DenseLayer(nn.Module):
    """One bottleneck layer H_l: concat(x_0..x_{l-1}) (B, C_in, H, W) -> BN-ReLU-1x1(4k)-BN-ReLU-3x3(k) (B, k, H, W)."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int, drop_rate: float, memory_efficient: bool):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def bottleneck(self, *inputs: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, inputs: list[Tensor]) -> Tensor:
        if self.memory_efficient and any(t.requires_grad for t in inputs):
            # The concatenation grows quadratically with depth; recompute it in backward instead of storing it.
            out = cp.checkpoint(self.bottleneck, *inputs, use_reentrant=False)
        else:
            out = self.bottleneck(*inputs)
        out = self.conv2(self.relu2(self.norm2(out)))
        return F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers: (B, C, H, W) -> (B, C + num_layers * k, H, W)."""

    def __init__(self, num_layers: int, cin: int, bn_size: int, growth_rate: int, drop_rate: float,
                 memory_efficient: bool):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(cin + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """Compression between blocks: BN-ReLU-1x1 conv (C_in -> C_out), 2x2 average pooling (H, W halve)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(Backbone):
    """DenseNet(-BC) classifier: images (B, 3, H, W) -> logits (B, num_classes).

    growth_rate: k, maps added per layer; block_config: layers per dense block; num_init_features: the
    stem's channels (2k for DenseNet-BC); bn_size: bottleneck width as a multiple of k; compression:
    theta, the fraction of channels a transition keeps; cifar: 3x3 stem without pooling (32x32 inputs).
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000,
                 memory_efficient: bool = False, compression: float = 0.5, cifar: bool = False):
        super().__init__()
        if len(block_config) < 2 or min(block_config) < 1:
            raise ValueError(f"block_config must list at least two dense blocks of >= 1 layer, got {block_config}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if growth_rate < 1 or num_classes < 1:
            raise ValueError(f"growth_rate and num_classes must be positive, got {growth_rate} and {num_classes}")
        self.cifar = cifar
        if cifar:
            stem = [("conv0", nn.Conv2d(3, num_init_features, 3, padding=1, bias=False))]
        else:
            stem = [("conv0", nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(3, 2, 1))]
        self.stem_names = [name for name, _ in stem]
        self.features = nn.Sequential(OrderedDict(stem))
        channels = num_init_features
        self.num_blocks = len(block_config)
        self.transition_channels: list[int] = []
        self.block_channels: list[int] = []
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(n, channels, bn_size, growth_rate, drop_rate, memory_efficient))
            channels += n * growth_rate
            self.block_channels.append(channels)
            if i != len(block_config) - 1:
                out = int(channels * compression)
                self.features.add_module(f"transition{i + 1}", Transition(channels, out))
                self.transition_channels.append(out)
                channels = out
        self.features.add_module(f"norm{len(block_config) + 1}", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.final_channels = channels
        init_weights(self, conv=kaiming_normal_init("fan_in"), bias=0.0)  # the classifier's bias; convs have none

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def detection_parts(self) -> DetectionParts:
        """Trunk: stem .. last-but-one block + that transition's BN-ReLU-conv (stride 16; CIFAR: 2).
        RoI head: the transition's pooling, the last block, final BN-ReLU, global average pooling."""
        f, n = self.features, self.num_blocks
        cut = getattr(f, f"transition{n - 1}")
        stages = [nn.Sequential(*(getattr(f, name) for name in self.stem_names))]
        stages += [nn.Sequential(getattr(f, f"denseblock{i}"), getattr(f, f"transition{i}")) for i in range(1, n - 1)]
        stages.append(nn.Sequential(getattr(f, f"denseblock{n - 1}"), cut.norm, cut.relu, cut.conv))
        head = nn.Sequential(cut.pool, getattr(f, f"denseblock{n}"), getattr(f, f"norm{n + 1}"), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        # stem /4 (ImageNet) or /1 (CIFAR), then one /2 per transition pooling inside the trunk
        stride = (1 if self.cifar else 4) * 2 ** (n - 2)
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=head, out_channels=self.transition_channels[-1],
                              stride=stride, head_channels=self.final_channels, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per dense block, ending at the block's output before its transition (torchvision's and
        Detectron2's cut): ``denseblock1`` (the stem and block 1, stride 4; CIFAR: 1), then ``denseblock{i}``
        (transition i - 1, whose pooling halves the map, and block i), the last one with the final BN.
        DenseNet-121: 256, 512, 1024, 1024 channels at strides 4, 8, 16, 32."""
        f, n = self.features, self.num_blocks
        stages, info = [], []
        for i in range(1, n + 1):
            names = self.stem_names if i == 1 else [f"transition{i - 1}"]
            names = [*names, f"denseblock{i}"] + ([f"norm{n + 1}"] if i == n else [])
            stages.append(nn.Sequential(*(getattr(f, name) for name in names)))
            info.append(FeatureInfo(f"denseblock{i}", self.block_channels[i - 1],
                                    (1 if self.cifar else 4) * 2 ** (i - 1)))
        return FeatureStages(stages, info)

    def remap_state_dict(self, state: dict) -> dict:
        """torchvision's early densenet checkpoints name ``denselayer1.norm1`` as ``denselayer1.norm.1``
        (torchvision remaps them in its own ``_load_state_dict``); do the same."""
        return {_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}


_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var"
                      r"|num_batches_tracked))$")


PAPER = "Huang et al. 2017"
#: 224x224 inputs; 14x14 RoIs, halved by transition 3's pooling to the 7x7 dense block 4 sees in the classifier
IMAGENET = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=14, min_input_size=32)
OPTIONS = dict(drop_rate=0.0, memory_efficient=False)


def imagenet(name: str, k: int, blocks: tuple[int, ...], init: int) -> Variant:
    return Variant(name, DenseNet, PAPER, IMAGENET,
                   args=dict(growth_rate=k, block_config=blocks, num_init_features=init, bn_size=4),
                   options=dict(num_classes=1000, **OPTIONS),
                   doc=f"DenseNet-BC for 224x224 inputs: k = {k}, {init} stem channels, dense blocks of {blocks} "
                       "layers.")


VARIANTS: list[Variant] = [
    imagenet("densenet121", 32, (6, 12, 24, 16), 64),
    imagenet("densenet169", 32, (6, 12, 32, 32), 64),
    imagenet("densenet201", 32, (6, 12, 48, 32), 64),
    imagenet("densenet161", 48, (6, 12, 36, 24), 96),
    Variant("densenet_bc_100_12", DenseNet, PAPER, CIFAR_DEFAULTS,
            args=dict(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, bn_size=4, cifar=True),
            options=dict(num_classes=10, **OPTIONS),
            doc="CIFAR DenseNet-BC, L = 100, k = 12: three blocks of 16 bottleneck layers, 2k initial features."),
]
