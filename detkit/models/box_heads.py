"""Light box heads: the layers between the pooled regions and the box predictor, as an alternative to the
backbone's own RoI head (VGG's fc6/fc7, ResNet's res5).

The FPN paper (Lin et al. 2017, Sec. 4.2) replaces the conv5 head by two 1024-d fully connected layers
with ReLU on 7x7 pooled regions ("2fc", torchvision's ``TwoMLPHead``, Detectron2's ``FastRCNNConvFCHead``
with ``NUM_FC: 2``), lighter and faster than res5 on every region; Detectron2's ``4conv1fc`` variant puts
3x3 convolutions before one fully connected layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from detkit.config import ConfigError, ranged


@dataclass
class TwoFCSettings:
    """The ``two_fc`` box head's config keys."""

    fc_dim: int = ranged(1024, ge=1)


@dataclass
class ConvFCSettings:
    """The ``conv_fc`` box head's config keys."""

    num_conv: int = ranged(4, ge=1)
    conv_dim: int = ranged(256, ge=1)
    fc_dim: int = ranged(1024, ge=1)
    norm: bool = False  # batch norm after each convolution (Detectron2's GN/BN variants)


class TwoFCHead(nn.Sequential):
    """``(R, *pooled_shape)`` -> flatten -> fc -> ReLU -> fc -> ReLU -> ``(R, fc_dim)``."""

    def __init__(self, in_features: int, fc_dim: int = 1024):
        if fc_dim < 1:
            raise ConfigError(f"model.box_head.fc_dim={fc_dim}: expected a positive width")
        super().__init__(nn.Flatten(1), nn.Linear(in_features, fc_dim), nn.ReLU(inplace=True),
                         nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True))
        self.out_features = fc_dim
        for layer in (self[1], self[3]):  # Detectron2's c2_xavier_fill: kaiming_uniform(a=1), bias 0
            nn.init.kaiming_uniform_(layer.weight, a=1)
            nn.init.zeros_(layer.bias)


class ConvFCHead(nn.Module):
    """``(R, C, S, S)`` -> ``num_conv`` x (3x3 conv [+ BN] + ReLU) -> flatten -> fc -> ReLU -> ``(R, fc_dim)``."""

    def __init__(self, in_channels: int, size: tuple[int, int], settings: ConvFCSettings):
        super().__init__()
        if min(settings.num_conv, settings.conv_dim, settings.fc_dim) < 1:
            raise ConfigError(f"model.box_head: num_conv={settings.num_conv}, conv_dim={settings.conv_dim}, "
                              f"fc_dim={settings.fc_dim}: expected positive numbers")
        layers: list[nn.Module] = []
        for k in range(settings.num_conv):
            conv = nn.Conv2d(in_channels if k == 0 else settings.conv_dim, settings.conv_dim, 3, padding=1,
                             bias=not settings.norm)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers += [conv, *([nn.BatchNorm2d(settings.conv_dim)] if settings.norm else []), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(settings.conv_dim * size[0] * size[1], settings.fc_dim)
        nn.init.kaiming_uniform_(self.fc.weight, a=1)
        nn.init.zeros_(self.fc.bias)
        self.out_features = settings.fc_dim

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu(self.fc(self.convs(x).flatten(1)))
