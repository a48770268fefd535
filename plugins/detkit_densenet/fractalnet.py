"""FractalNet (Larsson et al. 2017): ultra-deep networks without residuals.

A fractal block follows the expansion rule f_1(z) = conv(z), f_{C+1}(z) = join(f_C(f_C(z)), conv(z)),
giving C columns and 2^C - 1 convolutions (3x3 conv, BN, ReLU); a join is the element-wise mean of its
active inputs. Regularisation by drop-path (Sec. 3.1): *local* drop-path drops each input of a join with
probability 0.15 (keeping at least one); *global* drop-path picks one column for the whole network, so
every join keeps only that column's input. In training each mini-batch uses one or the other with
probability 0.5. At test time all columns are averaged.

``fractalnet_cifar``: B = 5 blocks of C = 3 columns (the paper's 20-layer CIFAR network; ``columns=4``
gives 40 layers), 64-128-256-512-512 channels, 2x2 max pooling after each block, optional dropout
0.0-0.4 by block (Sec. 4.1). With 10 classes it has 33.7M parameters (the paper reports 38.6M without
giving the layer details that account for the difference). ``fractalnet34``: the ImageNet form compared with ResNet-34 in Sec. 4.3: a 7x7/2
convolution and max pooling, then B = 4 blocks of C = 4 columns (64-128-256-512), 34 layers deep.

Detection: the trunk ends before the last pooling that would pass stride 16 (ImageNet form) or 4 (CIFAR);
the RoI head is the remaining pooling/blocks and global average pooling.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DropPath:
    """The drop-path mode of one forward pass: None (test: average all), ("local", p) or ("global", column)."""

    def __init__(self, mode: tuple | None = None):
        self.mode = mode


def join(inputs: list[Tensor], columns: list[int], drop: DropPath, training: bool) -> Tensor:
    """Mean of the active inputs; ``columns[i]`` is the column index (within the whole block) of input i."""
    if training and drop.mode is not None:
        kind, value = drop.mode
        if kind == "global":
            kept = [x for x, c in zip(inputs, columns) if c == value]
            if kept:
                return kept[0]
            # this join lies on no path of the chosen column; its value is never used
            return torch.stack(inputs).mean(0)
        keep = torch.rand(len(inputs)) >= value
        if not keep.any():
            keep[int(torch.randint(len(inputs), ()))] = True  # at least one input survives
        inputs = [x for x, k in zip(inputs, keep.tolist()) if k]
    return torch.stack(inputs).mean(0)


class FractalBlock(nn.Module):
    def __init__(self, columns: int, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.columns = columns
        self.shallow = conv_bn_relu(cin, cout)  # column 0: one convolution
        if columns > 1:
            self.deep_in = FractalBlock(columns - 1, cin, cout)
            self.deep_out = FractalBlock(columns - 1, cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop = DropPath()

    def column_outputs(self, x: Tensor, drop: DropPath) -> list[Tensor]:
        """Outputs of columns 0..C-1 before this block's final join."""
        outs = [self.shallow(x)]
        if self.columns > 1:
            sub = drop
            if drop.mode is not None and drop.mode[0] == "global":
                sub = DropPath(("global", drop.mode[1] - 1))  # this block's column c is the sub-block's c - 1
            mid_cols = self.deep_in.column_outputs(x, sub)
            mid = join(mid_cols, list(range(1, self.columns)), drop, self.training)
            outs += self.deep_out.column_outputs(mid, sub)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        outs = self.column_outputs(x, self.drop)
        return self.dropout(join(outs, list(range(self.columns)), self.drop, self.training))

    def num_convs(self) -> int:
        return sum(1 for m in self.modules() if isinstance(m, nn.Conv2d))


class FractalNet(Backbone):
    def __init__(self, widths: tuple[int, ...], columns: int = 4, num_classes: int = 10, cifar: bool = True,
                 dropout: tuple[float, ...] | None = None, local_drop: float = 0.15, global_ratio: float = 0.5,
                 detection_cut: int = 3):
        super().__init__()
        self.local_drop, self.global_ratio, self.columns = local_drop, global_ratio, columns
        if cifar:
            self.defaults = BackboneDefaults(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD,
                                             roi_output_size=8, min_input_size=32)
            self.stem = nn.Identity()
            cin = 3
        else:
            self.defaults = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=14, min_input_size=64)
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
            cin = 64
        dropout = dropout or (0.0,) * len(widths)
        self.blocks = nn.ModuleList()
        for w, p in zip(widths, dropout):
            self.blocks.append(FractalBlock(columns, cin, w, p))
            cin = w
        # CIFAR: pooling after every block; ImageNet: after every block but the last.
        self.pools = nn.ModuleList(nn.MaxPool2d(2) for _ in range(len(widths) if cifar else len(widths) - 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.widths, self.cifar, self.cut = widths, cifar, detection_cut

    def _layers(self) -> list[nn.Module]:
        layers: list[nn.Module] = [self.stem]
        for i, block in enumerate(self.blocks):
            layers.append(block)
            if i < len(self.pools):
                layers.append(self.pools[i])
        return layers

    def _set_drop(self) -> None:
        if self.training:
            if float(torch.rand(())) < self.global_ratio:
                mode = ("global", int(torch.randint(self.columns, ())))
            else:
                mode = ("local", self.local_drop)
        else:
            mode = None
        for block in self.blocks:
            _propagate(block, mode)

    def forward(self, x: Tensor) -> Tensor:
        self._set_drop()
        for layer in self._layers():
            x = layer(x)
        return self.fc(self.avgpool(x).flatten(1))

    def detection_parts(self) -> DetectionParts:
        layers = self._layers()
        # The trunk keeps `cut` blocks and the pools between them (not the pool after the last of them).
        end = layers.index(self.blocks[self.cut - 1]) + 1
        trunk = _DropPathScope(self, nn.Sequential(*layers[:end]))
        head = _DropPathScope(self, nn.Sequential(*layers[end:], self.avgpool, nn.Flatten(1)))
        stride = 2 ** (self.cut - 1) * (1 if self.cifar else 4)
        return DetectionParts(trunk=trunk, roi_head=head, out_channels=self.widths[self.cut - 1], stride=stride,
                              head_channels=self.widths[-1], stages=layers[: end])


class _DropPathScope(nn.Module):
    """Runs part of a FractalNet with a drop-path mode drawn for this forward pass."""

    def __init__(self, net: FractalNet, body: nn.Module):
        super().__init__()
        self.body = body
        self._net = [net]  # a list keeps the parent out of this module's children

    def forward(self, x: Tensor) -> Tensor:
        self._net[0]._set_drop()
        return self.body(x)


def _propagate(block: FractalBlock, mode) -> None:
    for m in block.modules():
        if isinstance(m, FractalBlock):
            m.drop = DropPath(mode)


def fractalnet_cifar(num_classes: int = 10, columns: int = 3, dropout: bool = False) -> FractalNet:
    return FractalNet((64, 128, 256, 512, 512), columns, num_classes, cifar=True,
                      dropout=(0.0, 0.1, 0.2, 0.3, 0.4) if dropout else None, detection_cut=3)


def fractalnet34(num_classes: int = 1000, columns: int = 4) -> FractalNet:
    return FractalNet((64, 128, 256, 512), columns, num_classes, cifar=False, detection_cut=3)


VARIANTS = {"fractalnet_cifar": fractalnet_cifar, "fractalnet34": fractalnet34}
