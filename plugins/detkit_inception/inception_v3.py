"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision", Table 1).

Factorised convolutions (5x5 as two 3x3, 7x7 as 1x7 + 7x1, Sec. 3), the efficient grid-size reduction
modules (Sec. 5, Fig. 10: a stride-2 convolution branch beside a pooling branch), and a batch-normalised
auxiliary classifier on the 17x17 grid (Sec. 4, the "BN-auxiliary" row of Table 3). torchvision's
structure and names (27,161,264 parameters with the auxiliary classifier, 23,834,568 without), so its
checkpoints load. Default input 299x299; the smallest input the network accepts is 75x75.

Training loss (``classification_loss``): label smoothing (Sec. 7, q'(k) = (1 - eps) q(k) + eps / K) with
eps = ``label_smoothing``, 0.1 by default because Inception-v3 is, by the paper's definition (Table 3, last
row), the network trained with all of its changes including label smoothing at 0.1; and the auxiliary
loss weighted by ``aux_weight`` = 0.4. The paper gives no weight; 0.4 (with the same smoothing on the
auxiliary head) is what the authors' released training code used (tensorflow/models, inception and slim
``train_image_classifier``). The notes' 0.3 is GoogLeNet's weight (and GoogLeNet here uses it).

torchvision's pretrained Inception-v3 expects inputs in [-1, 1] (torchvision sets ``transform_input=True``
when loading those weights); ``defaults.mean/std`` are 0.5 / 0.5, so the detector's normalisation already
produces that input.

Detection: the trunk is the stem, the 35x35 modules Mixed_5b-5d, and the 17x17 grid (Mixed_6a-6e, 768
channels, stride 16). The stem's unpadded convolutions and the unpadded grid reduction shave the borders:
an H x H input gives an (H/16 - 2)-sided map when H is a multiple of 32 (299 -> 17). The RoI head is the
8x8 part (Mixed_7a-7c) and global average pooling (2048) on 14x14 pooled features; Mixed_7a halves them
to 6x6 (7x7 RoIs would also work, 3x3 after Mixed_7a, but 14 keeps the head's grid near the
classification network's 8x8, as ResNet-C4 detectors do).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import Backbone, DetectionParts, FeatureInfo, FeatureStages, init_weights, trunc_normal_init
from detkit_inception.googlenet import BasicConv2d

BC = BasicConv2d


class InceptionA(nn.Module):  # 35x35: 5x5 and double-3x3 branches (Fig. 5)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BC(cin, 64, kernel_size=1)
        self.branch5x5_1 = BC(cin, 48, kernel_size=1)
        self.branch5x5_2 = BC(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BC(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BC(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BC(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BC(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):  # 35 -> 17 grid reduction (Fig. 10)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BC(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BC(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BC(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BC(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # 17x17: asymmetric 1x7 / 7x1 factorisation (Fig. 6)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BC(cin, 192, kernel_size=1)
        self.branch7x7_1 = BC(cin, c7, kernel_size=1)
        self.branch7x7_2 = BC(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BC(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BC(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BC(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BC(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BC(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BC(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BC(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionD(nn.Module):  # 17 -> 8 grid reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BC(cin, 192, kernel_size=1)
        self.branch3x3_2 = BC(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BC(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BC(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BC(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BC(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # 8x8: expanded filter banks (Fig. 7)
    def __init__(self, cin: int):
        super().__init__()
        self.branch1x1 = BC(cin, 320, kernel_size=1)
        self.branch3x3_1 = BC(cin, 384, kernel_size=1)
        self.branch3x3_2a = BC(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BC(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BC(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BC(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BC(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BC(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BC(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionAux(nn.Module):
    """Batch-normalised auxiliary classifier on the 17x17 grid: (B, 768, H, W) -> (B, num_classes)."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv0 = BC(cin, 128, kernel_size=1)
        self.conv1 = BC(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # The paper's 5x5/3 pooling (17x17 -> 5x5); grids smaller than 17 (small inputs) are pooled to 5x5
        # adaptively so the 5x5 convolution still applies.
        x = F.avg_pool2d(x, 5, 3) if min(x.shape[-2:]) >= 17 else F.adaptive_avg_pool2d(x, 5)
        x = self.conv1(self.conv0(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionV3(Backbone):
    """Inception-v3: images (B, 3, H, W), H, W >= 75 -> logits (B, num_classes); in training with
    ``aux_logits`` a tuple (logits, aux logits), each (B, num_classes)."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, dropout: float = 0.5,
                 label_smoothing: float = 0.1, aux_weight: float = 0.4):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"InceptionV3: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"InceptionV3: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.aux_weight = label_smoothing, aux_weight
        self.Conv2d_1a_3x3 = BC(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BC(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BC(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = BC(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BC(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(3, 2)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.AuxLogits = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2048, num_classes)
        init_weights(self, conv=trunc_normal_init(0.1), linear=trunc_normal_init(0.1))

    def _stem(self) -> nn.Sequential:
        return nn.Sequential(self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                             self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2)

    def _grid35(self) -> nn.Sequential:
        return nn.Sequential(self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)

    def _grid17(self) -> nn.Sequential:
        return nn.Sequential(self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)

    def _head(self) -> nn.Sequential:
        return nn.Sequential(self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool, nn.Flatten(1))

    def forward(self, x: Tensor):
        x = self._grid17()(self._grid35()(self._stem()(x)))
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        logits = self.fc(self.dropout(self._head()(x)))
        return (logits, aux) if aux is not None else logits

    def classification_loss(self, outputs, targets: Tensor) -> Tensor:
        """Label-smoothed cross entropy of the logits, plus ``aux_weight`` x that of the auxiliary logits.

        outputs: logits (B, K) or the training tuple (logits, aux); targets: class indices (B,).
        """
        def smoothed(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

        if isinstance(outputs, (tuple, list)):
            if len(outputs) != 2:
                raise ValueError(f"InceptionV3.classification_loss: expected (logits, aux), "
                                 f"got a sequence of {len(outputs)}")
            return smoothed(outputs[0]) + self.aux_weight * smoothed(outputs[1])
        return smoothed(outputs)

    def detection_parts(self) -> DetectionParts:
        stages = [self._stem(), self._grid35(), self._grid17()]
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=self._head(), out_channels=768, stride=16,
                              head_channels=2048, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per resolution, each ending before the next grid reduction (as timm's ``feature_info``):
        ``Conv2d_2b_3x3`` (stride 2, 64 channels), ``Conv2d_4a_3x3`` (4, 192), ``Mixed_5d`` (8, 288),
        ``Mixed_6e`` (16, 768), ``Mixed_7c`` (32, 2048). Unpadded convolutions shave the borders (299 -> 8
        at stride 32); the auxiliary classifier is no stage."""
        stages = [nn.Sequential(self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3),
                  nn.Sequential(self.maxpool1, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3),
                  nn.Sequential(self.maxpool2, *self._grid35()), self._grid17(),
                  nn.Sequential(self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)]
        info = [FeatureInfo("Conv2d_2b_3x3", 64, 2), FeatureInfo("Conv2d_4a_3x3", 192, 4),
                FeatureInfo("Mixed_5d", 288, 8), FeatureInfo("Mixed_6e", 768, 16), FeatureInfo("Mixed_7c", 2048, 32)]
        return FeatureStages(stages, info)
