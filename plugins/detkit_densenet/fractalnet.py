"""FractalNet (Larsson et al. 2017): ultra-deep networks without residuals (Sec. 2, 3 and 4).

A fractal block with C columns follows the expansion rule (Sec. 2)

    f_1(z) = conv(z),    f_{C+1}(z) = join(f_C(f_C(z)), conv(z)),

where conv is a 3x3 convolution, batch normalisation and ReLU, and join is the element-wise mean of its
active inputs. A block has 2^C - 1 convolutions; column c (0-based, 0 the shallowest) is a chain of 2^c of
them. As in the paper's Figure 1, a join that takes another join's output absorbs that join's inputs, so a
block's last join has C inputs (one per column) and the join between the two halves f_C(f_C(.)) has C - 1.
The network is B blocks, each followed by 2x2 max pooling, then global average pooling and the classifier.

Drop-path (Sec. 3.1), drawn once per mini-batch: with probability 0.5 *local* (each input of every join is
dropped with probability 0.15; at least one input of each join survives), otherwise *global* (one column,
chosen uniformly, is the only path through every block of the network). At test time every join averages
all of its inputs, deterministically. Optional dropout after each block uses the paper's rates
0, 0.1, 0.2, 0.3, 0.4 (Sec. 4).

Variants:
- ``fractalnet_cifar``: B = 5 blocks of C = 4 columns (the 40-layer network of Figure 1) with 64, 128, 256,
  512, 512 channels for 32x32 inputs (``columns=3`` gives the 20-layer network of Table 1). With these widths
  and 10 classes it has 76.1M parameters (C = 4) and 33.7M (C = 3); the paper lists 22.9M and 38.6M without
  the per-layer details that would account for the difference, so the counts are not compared.
- ``fractalnet34``: the ImageNet network of Sec. 4.3, compared there with ResNet-34: ResNet-34's first and
  last layers (7x7/2 convolution, 3x3/2 max pooling; global average pooling, classifier) around B = 4 blocks
  of C = 4 columns (1 + 4 * 8 + 1 = 34 layers) with 64, 128, 256, 512 channels; the last block is not
  followed by pooling, so the strides are 4, 8, 16, 32 as in ResNet-34's stages.

Detection cut (the analogue of ResNet's C4): the trunk is everything up to the output of the last-but-one
block (without the pooling that follows it), the RoI head is that pooling, the last block (and its pooling
in the CIFAR form) and global average pooling. fractalnet34: stride 16, 256 -> 512 channels, 14x14 RoIs
(pooled to 7x7 for the last block, as in the 224x224 classifier); fractalnet_cifar: stride 8, 512 -> 512
channels, 8x8 RoIs. Drop-path is drawn independently for the trunk and for the RoI head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detkit.backbones import (CIFAR_DEFAULTS, Backbone, BackboneDefaults, DetectionParts, FeatureInfo, FeatureStages,
                              Variant)

PAPER_DROPOUT = (0.0, 0.1, 0.2, 0.3, 0.4)


@dataclass(frozen=True)
class DropPath:
    """The drop-path of one mini-batch: ``kind`` "local" (each join input dropped with probability ``p``)
    or "global" (only column ``column`` is used)."""

    kind: str
    p: float = 0.15
    column: int = 0

    def __post_init__(self):
        if self.kind not in ("local", "global"):
            raise ValueError(f"drop-path kind must be 'local' or 'global', got {self.kind!r}")
        if self.kind == "local" and not 0.0 <= self.p < 1.0:
            raise ValueError(f"local drop-path probability must be in [0, 1), got {self.p}")


def sample_drop_path(columns: int, local_p: float, global_ratio: float) -> DropPath:
    """One mini-batch's drop-path: global with probability ``global_ratio`` (a uniformly chosen column), else local."""
    if float(torch.rand(())) < global_ratio:
        return DropPath("global", column=int(torch.randint(columns, ())))
    return DropPath("local", p=local_p)


def join(inputs: list[Tensor], drop_path: DropPath | None = None) -> Tensor:
    """Element-wise mean of the inputs (each (B, C, H, W)) that survive local drop-path.

    Each input is dropped with probability ``drop_path.p``; if all are, one chosen at random is kept.
    With ``drop_path`` None (evaluation) all inputs are averaged.
    """
    if drop_path is not None and drop_path.kind == "local" and len(inputs) > 1:
        keep = torch.rand(len(inputs)) >= drop_path.p
        if not keep.any():
            keep[int(torch.randint(len(inputs), ()))] = True
        inputs = [x for x, k in zip(inputs, keep.tolist()) if k]
    return inputs[0] if len(inputs) == 1 else torch.stack(inputs).mean(0)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FractalBlock(nn.Module):
    """f_C: (B, C_in, H, W) -> (B, C_out, H, W) with C columns and 2^C - 1 convolutions.

    ``shallow`` is the conv(z) column; ``deep_in`` and ``deep_out`` are the two copies of f_{C-1}, whose
    columns are this block's columns 1..C-1.
    """

    def __init__(self, columns: int, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        if columns < 1:
            raise ValueError(f"a fractal block needs at least one column, got {columns}")
        self.columns = columns
        self.shallow = conv_bn_relu(cin, cout)
        if columns > 1:
            self.deep_in = FractalBlock(columns - 1, cin, cout)
            self.deep_out = FractalBlock(columns - 1, cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def column(self, x: Tensor, c: int) -> Tensor:
        """Column ``c`` alone: a chain of 2^c convolutions (what global drop-path runs)."""
        if not 0 <= c < self.columns:
            raise ValueError(f"column {c} out of range for a block of {self.columns} columns")
        if c == 0:
            return self.shallow(x)
        return self.deep_out.column(self.deep_in.column(x, c - 1), c - 1)

    def column_outputs(self, x: Tensor, drop_path: DropPath | None) -> list[Tensor]:
        """The C inputs of this block's last join: column 0's output, then those of columns 1..C-1."""
        outs = [self.shallow(x)]
        if self.columns > 1:
            middle = join(self.deep_in.column_outputs(x, drop_path), drop_path)
            outs += self.deep_out.column_outputs(middle, drop_path)
        return outs

    def forward(self, x: Tensor, drop_path: DropPath | None = None) -> Tensor:
        if drop_path is not None and drop_path.kind == "global":
            out = self.column(x, drop_path.column)
        else:
            out = join(self.column_outputs(x, drop_path), drop_path)
        return self.dropout(out)

    def num_convs(self) -> int:
        return sum(1 for m in self.modules() if isinstance(m, nn.Conv2d))


class FractalSequence(nn.Module):
    """Runs a list of layers in order, drawing one drop-path per training forward for its fractal blocks.

    layers: stems, fractal blocks and poolings of a :class:`FractalNet` (shared, not copied).
    """

    def __init__(self, layers: list[nn.Module], columns: int, local_p: float, global_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.columns, self.local_p, self.global_ratio = columns, local_p, global_ratio

    def forward(self, x: Tensor) -> Tensor:
        drop_path = sample_drop_path(self.columns, self.local_p, self.global_ratio) if self.training else None
        for layer in self.layers:
            x = layer(x, drop_path) if isinstance(layer, FractalBlock) else layer(x)
        return x


class FractalNet(Backbone):
    """FractalNet classifier: images (B, 3, H, W) -> logits (B, num_classes).

    widths: channels of the B blocks; columns: C; cifar: no stem and pooling after every block (32x32
    inputs), else ResNet-34's stem and no pooling after the last block; dropout: per-block dropout rates
    (True: the paper's, ``PAPER_DROPOUT``; None or False: none); local_p: local drop-path probability per
    join input; global_ratio: share of mini-batches using global drop-path.
    """

    def __init__(self, widths: tuple[int, ...], columns: int = 4, num_classes: int = 10, cifar: bool = True,
                 dropout: tuple[float, ...] | bool | None = None, local_p: float = 0.15, global_ratio: float = 0.5):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"FractalNet needs at least two blocks, got widths {widths}")
        if isinstance(dropout, bool):
            dropout = PAPER_DROPOUT if dropout else None
        dropout = tuple(dropout) if dropout is not None else (0.0,) * len(widths)
        if len(dropout) != len(widths):
            raise ValueError(f"dropout has {len(dropout)} rates for {len(widths)} blocks: {dropout}")
        DropPath("local", p=local_p)  # validates local_p
        if not 0.0 <= global_ratio <= 1.0:
            raise ValueError(f"global_ratio must be in [0, 1], got {global_ratio}")
        self.columns, self.local_p, self.global_ratio = columns, local_p, global_ratio
        self.widths, self.cifar = tuple(widths), cifar
        if cifar:
            self.stem = nn.Identity()
            cin = 3
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            cin = 64
        self.blocks = nn.ModuleList()
        for w, p in zip(widths, dropout):
            self.blocks.append(FractalBlock(columns, cin, w, p))
            cin = w
        self.pools = nn.ModuleList(nn.MaxPool2d(2) for _ in range(len(widths) if cifar else len(widths) - 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def _layers(self) -> list[nn.Module]:
        """Stem, then each block followed by its pooling (if any), in forward order."""
        layers: list[nn.Module] = [self.stem]
        for i, block in enumerate(self.blocks):
            layers.append(block)
            if i < len(self.pools):
                layers.append(self.pools[i])
        return layers

    def _sequence(self, layers: list[nn.Module]) -> FractalSequence:
        return FractalSequence(layers, self.columns, self.local_p, self.global_ratio).train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        drop_path = sample_drop_path(self.columns, self.local_p, self.global_ratio) if self.training else None
        for layer in self._layers():
            x = layer(x, drop_path) if isinstance(layer, FractalBlock) else layer(x)
        return self.fc(self.avgpool(x).flatten(1))

    def detection_parts(self) -> DetectionParts:
        """Trunk: up to the last-but-one block's output; RoI head: its pooling, the last block, avg pooling."""
        layers = self._layers()
        end = layers.index(self.blocks[-2]) + 1
        trunk = self._sequence(layers[:end])
        head = nn.Sequential(self._sequence(layers[end:]), self.avgpool, nn.Flatten(1))
        # every block before the cut but the last one is followed by a 2x2 pooling; the stem divides by 4
        stride = 2 ** (len(self.blocks) - 2) * (1 if self.cifar else 4)
        stages: list[nn.Module] = [] if self.cifar else [self.stem]
        stages += [nn.Sequential(b, p) for b, p in zip(self.blocks[:-2], self.pools)] + [self.blocks[-2]]
        return DetectionParts(trunk=trunk, box_head=head, out_channels=self.widths[-2], stride=stride,
                              head_channels=self.widths[-1], stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per fractal block, ending at the block's output (the pooling after it starts the next
        stage): ``block1`` (the stem and block 1), ..., ``block{B}``. fractalnet34: 64, 128, 256, 512 channels
        at strides 4, 8, 16, 32; fractalnet_cifar: 64, 128, 256, 512, 512 at 1, 2, 4, 8, 16 (the 2x2 pooling
        after its last block feeds only the global average pooling, so it is no stage). Each stage draws its
        own drop-path in training, as the detection trunk and RoI head do."""
        layers = self._layers()
        ends = [layers.index(block) + 1 for block in self.blocks]
        stages = [self._sequence(layers[start:end]) for start, end in zip([0, *ends], ends)]
        info = [FeatureInfo(f"block{i + 1}", w, (1 if self.cifar else 4) * 2 ** i) for i, w in enumerate(self.widths)]
        return FeatureStages(stages, info)


PAPER = "Larsson et al. 2017"
VARIANTS: list[Variant] = [
    Variant("fractalnet_cifar", FractalNet, PAPER, CIFAR_DEFAULTS,
            args=dict(widths=(64, 128, 256, 512, 512), cifar=True),
            options=dict(num_classes=10, columns=4, dropout=False, local_p=0.15, global_ratio=0.5),
            doc="CIFAR FractalNet: B = 5, C = 4 (40 layers; columns=3: 20 layers), 64-128-256-512-512 channels; "
                "dropout=True: the paper's per-block rates."),
    # 14x14 RoIs: the pooling before the last block makes them the 7x7 of the 224x224 classifier
    Variant("fractalnet34", FractalNet, PAPER,
            BackboneDefaults(input_size=(3, 224, 224), roi_output_size=14, min_input_size=64),
            args=dict(widths=(64, 128, 256, 512), cifar=False),
            options=dict(num_classes=1000, columns=4, local_p=0.15, global_ratio=0.5),
            doc="ImageNet FractalNet-34: ResNet-34's stem and head around 4 blocks of 4 columns, "
                "64-128-256-512 channels."),
]
