"""GoogLeNet / Inception v1 (Szegedy et al. 2015, "Going deeper with convolutions") and BN-Inception
(Ioffe & Szegedy 2015, "Batch Normalization", Sec. 4.2 and the table of its Fig. 5).

An Inception module runs 1x1, 3x3 and 5x5 convolutions and 3x3 max pooling in parallel and concatenates
them along channels; 1x1 "reduce" convolutions in front of the 3x3 and 5x5 (and after the pooling) keep
the cost down (Sec. 4, Fig. 2b). ``naive=True`` builds the module without them (Fig. 2a): the pooling
branch then passes all its input channels through, so the width grows with every module (the notes'
"dimension keeps increasing"). Two auxiliary classifiers (average pool -> 1x1 conv 128 -> FC 1024 ->
dropout 0.7 -> FC) on inception4a and inception4d add 0.3 x their loss in training and are discarded at
inference (Sec. 5; the notes: total loss = loss + 0.3 aux1 + 0.3 aux2).

Variants:
    ``googlenet``: torchvision's structure and names (batch-normalised convolutions, and the "5x5" branch
        built from a 3x3 kernel, as torchvision's checkpoints have it), so those checkpoints load;
        13,004,888 parameters with the auxiliary classifiers, 6,624,904 without, as torchvision.
        torchvision's pretrained GoogLeNet was trained on inputs scaled to [-1, 1] and, when loading
        those weights, torchvision sets ``transform_input=True`` to turn ImageNet-normalised input into
        that. Here the variant's ``defaults.mean/std`` are 0.5 / 0.5 instead, so the detector's own
        normalisation produces exactly the input the weights expect (no ``transform_input``).
    ``googlenet_v1``: the paper's network (true 5x5 kernels, no batch norm, LRN after conv1 and conv3).
    ``googlenet_naive``: ``googlenet(naive=True)``, every module naive (Fig. 2a, true 5x5 kernels).
    ``bn_inception``: 5x5 replaced by two 3x3, batch norm after every convolution, average pooling in
        some modules, stride-2 modules (3c, 4e) that drop the 1x1 branch and pass the pooled input through.

Detection cuts (stride 16; RoI head ends in global average pooling):
    GoogLeNet: trunk = stem, inception3a-3b + pool, inception4a-4e (832 channels); RoI head = the 2x2
        max pool, inception5a-5b, global average pool (1024) on 7x7 RoIs (the pool makes them 4x4).
    BN-Inception: stride 16 is reached in the stride-2 module 3c; trunk = stem, 3a-3c, 4a-4d (608
        channels); RoI head = the stride-2 module 4e (7x7 -> 4x4), 5a-5b, global average pool (1024).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.backbones import Backbone, DetectionParts, FeatureInfo, FeatureStages, init_weights, trunc_normal_init


class BasicConv2d(nn.Module):
    """conv -> (batch norm, eps 1e-3 as torchvision) -> ReLU: (B, cin, H, W) -> (B, cout, H', W')."""

    def __init__(self, cin: int, cout: int, bn: bool = True, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=not bn, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """The Inception module (Fig. 2b), or the naive module (Fig. 2a) when ``naive``.

    (B, cin, H, W) -> (B, out_channels, H, W), out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
    (+ cin instead of pool_proj for the naive module). ``k5`` is the "5x5" branch's kernel (3 in
    torchvision's checkpoints); the naive module's reduce widths are unused.
    """

    def __init__(self, cin: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int,
                 bn: bool = True, k5: int = 3, naive: bool = False):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, bn, kernel_size=1)
        if naive:
            self.branch2 = BasicConv2d(cin, ch3x3, bn, kernel_size=3, padding=1)
            self.branch3 = BasicConv2d(cin, ch5x5, bn, kernel_size=k5, padding=k5 // 2)
            self.branch4 = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + cin
        else:
            self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, bn, kernel_size=1),
                                         BasicConv2d(ch3x3red, ch3x3, bn, kernel_size=3, padding=1))
            self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, bn, kernel_size=1),
                                         BasicConv2d(ch5x5red, ch5x5, bn, kernel_size=k5, padding=k5 // 2))
            self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True),
                                         BasicConv2d(cin, pool_proj, bn, kernel_size=1))
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (Sec. 5): (B, cin, H, W) -> logits (B, num_classes); 4x4 average pooling is
    adaptive (torchvision's choice) so any grid works."""

    def __init__(self, cin: int, num_classes: int, bn: bool = True, dropout: float = 0.7):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, bn, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4))).flatten(1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


# (cin, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): Table 1 of the paper.
MODULES = {
    "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(Backbone):
    """GoogLeNet: images (B, 3, H, W), H, W >= 15 -> logits (B, num_classes); in training with
    ``aux_logits`` a tuple (logits, aux1 logits, aux2 logits), each (B, num_classes).

    bn: batch-normalised convolutions (torchvision's), else the paper's plain ones; k5: the "5x5" branch's
    kernel (None: 5 in naive modules, 3 in reduced ones, as torchvision's checkpoints have it); naive: the
    modules of Fig. 2a; lrn: LRN after conv1 and conv3 (the paper's).
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, bn: bool = True, k5: int | None = None,
                 naive: bool = False, lrn: bool = False, dropout: float = 0.4, aux_weight: float = 0.3):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"GoogLeNet: num_classes must be >= 1, got {num_classes}")
        if k5 is None:
            k5 = 5 if naive else 3
        self.aux_weight = aux_weight
        self.conv1 = BasicConv2d(3, 64, bn, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm1 = nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0) if lrn else nn.Identity()
        self.conv2 = BasicConv2d(64, 64, bn, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, bn, kernel_size=3, padding=1)
        self.norm2 = nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0) if lrn else nn.Identity()
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        cin = 192
        for key, spec in MODULES.items():
            module = Inception(cin, *spec[1:], bn=bn, k5=k5, naive=naive)
            setattr(self, f"inception{key}", module)
            cin = module.out_channels
            if key == "3b":
                self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
            if key == "4e":
                self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        c4a, c4d = self.inception4a.out_channels, self.inception4d.out_channels
        self.aux1 = InceptionAux(c4a, num_classes, bn) if aux_logits else None
        self.aux2 = InceptionAux(c4d, num_classes, bn) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        self.final_channels = cin
        init_weights(self, conv=trunc_normal_init(0.01), linear=trunc_normal_init(0.01))

    def _stem(self) -> nn.Sequential:
        return nn.Sequential(self.conv1, self.maxpool1, self.norm1, self.conv2, self.conv3, self.norm2, self.maxpool2)

    def forward(self, x: Tensor):
        x = self._stem()(x)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        logits = self.fc(self.dropout(self.avgpool(x).flatten(1)))
        if aux1 is not None:
            return logits, aux1, aux2
        return logits

    def classification_loss(self, outputs, targets: Tensor) -> Tensor:
        """main + 0.3 (aux1 + aux2) for training outputs (Sec. 5); the main loss alone for logits.

        outputs: logits (B, K) or the training tuple (logits, aux1, aux2); targets: class indices (B,).
        """
        if isinstance(outputs, (tuple, list)):
            if len(outputs) != 3:
                raise ValueError(f"GoogLeNet.classification_loss: expected (logits, aux1, aux2), "
                                 f"got a sequence of {len(outputs)}")
            main, aux1, aux2 = outputs
            return (F.cross_entropy(main, targets)
                    + self.aux_weight * (F.cross_entropy(aux1, targets) + F.cross_entropy(aux2, targets)))
        return F.cross_entropy(outputs, targets)

    def detection_parts(self) -> DetectionParts:
        stage3 = nn.Sequential(self.inception3a, self.inception3b, self.maxpool3)
        stage4 = nn.Sequential(self.inception4a, self.inception4b, self.inception4c, self.inception4d,
                               self.inception4e)
        stages = [self._stem(), stage3, stage4]
        head = nn.Sequential(self.maxpool4, self.inception5a, self.inception5b, self.avgpool, nn.Flatten(1))
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=head,
                              out_channels=self.inception4e.out_channels, stride=16,
                              head_channels=self.final_channels, stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per resolution, each ending before the next max pooling halves the map: ``conv1``
        (stride 2, 64 channels), ``conv3`` (4, 192), ``inception3b`` (8, 480), ``inception4e`` (16, 832),
        ``inception5b`` (32, 1024); each stage after the first begins with that pooling."""
        stages = [self.conv1, nn.Sequential(self.maxpool1, self.norm1, self.conv2, self.conv3, self.norm2),
                  nn.Sequential(self.maxpool2, self.inception3a, self.inception3b),
                  nn.Sequential(self.maxpool3, *(getattr(self, f"inception4{k}") for k in "abcde")),
                  nn.Sequential(self.maxpool4, self.inception5a, self.inception5b)]
        info = [FeatureInfo("conv1", 64, 2), FeatureInfo("conv3", 192, 4),
                FeatureInfo("inception3b", self.inception3b.out_channels, 8),
                FeatureInfo("inception4e", self.inception4e.out_channels, 16),
                FeatureInfo("inception5b", self.final_channels, 32)]
        return FeatureStages(stages, info)


# ----------------------------------------------------------------------------- BN-Inception


class BNInceptionModule(nn.Module):
    """An Inception module of Ioffe & Szegedy (2015, Fig. 5 table): 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1;
    ``stride=2`` modules drop the 1x1 branch and pass the max-pooled input through."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, d3r: int, d3: int, pool: str, proj: int,
                 stride: int = 1):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1) if c1 else None
        self.branch3 = nn.Sequential(BasicConv2d(cin, c3r, kernel_size=1),
                                     BasicConv2d(c3r, c3, kernel_size=3, stride=stride, padding=1))
        self.branch3dbl = nn.Sequential(BasicConv2d(cin, d3r, kernel_size=1),
                                        BasicConv2d(d3r, d3, kernel_size=3, padding=1),
                                        BasicConv2d(d3, d3, kernel_size=3, stride=stride, padding=1))
        pool_layer = nn.MaxPool2d(3, stride, 1) if pool == "max" else nn.AvgPool2d(3, stride, 1,
                                                                                    count_include_pad=False)
        self.branch_pool = nn.Sequential(pool_layer, BasicConv2d(cin, proj, kernel_size=1)) if proj else pool_layer
        self.out_channels = c1 + c3 + d3 + (proj if proj else cin)

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.branch1(x)] if self.branch1 is not None else []
        return torch.cat(outs + [self.branch3(x), self.branch3dbl(x), self.branch_pool(x)], 1)


# (1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool, pool proj, stride)
BN_INCEPTION = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1), "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1), "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1), "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1), "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


class BNInception(Backbone):
    """BN-Inception: images (B, 3, H, W), H, W >= 7 -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"BNInception: num_classes must be >= 1, got {num_classes}")
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2_reduce = BasicConv2d(64, 64, kernel_size=1)
        self.conv2 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        cin = 192
        self.keys = list(BN_INCEPTION)
        self.channels = {}
        for key, spec in BN_INCEPTION.items():
            module = BNInceptionModule(cin, *spec)
            setattr(self, f"inception{key}", module)
            cin = module.out_channels
            self.channels[key] = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def _mods(self, keys) -> list[nn.Module]:
        return [getattr(self, f"inception{k}") for k in keys]

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool2(self.conv2(self.conv2_reduce(self.pool1(self.conv1(x)))))
        for m in self._mods(self.keys):
            x = m(x)
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))

    def detection_parts(self) -> DetectionParts:
        # Stride 16 is reached by inception3c; the trunk runs to inception4d, the stride-2 module 4e
        # starts the RoI head.
        stem = nn.Sequential(self.conv1, self.pool1, self.conv2_reduce, self.conv2, self.pool2)
        stages = [stem, nn.Sequential(*self._mods(["3a", "3b", "3c"])),
                  nn.Sequential(*self._mods(["4a", "4b", "4c", "4d"]))]
        head = nn.Sequential(*self._mods(["4e", "5a", "5b"]), self.avgpool, nn.Flatten(1))
        return DetectionParts(trunk=nn.Sequential(*stages), box_head=head, out_channels=self.channels["4d"],
                              stride=16, head_channels=self.channels["5b"], stages=stages)

    def feature_stages(self) -> FeatureStages:
        """One stage per resolution, each ending before the next reduction (a max pooling, or the stride-2
        modules 3c and 4e, which then start the next stage): ``conv1`` (stride 2, 64 channels), ``conv2``
        (4, 192), ``inception3b`` (8, 320), ``inception4d`` (16, 608), ``inception5b`` (32, 1024)."""
        stages = [self.conv1, nn.Sequential(self.pool1, self.conv2_reduce, self.conv2),
                  nn.Sequential(self.pool2, *self._mods(["3a", "3b"])),
                  nn.Sequential(*self._mods(["3c", "4a", "4b", "4c", "4d"])),
                  nn.Sequential(*self._mods(["4e", "5a", "5b"]))]
        info = [FeatureInfo("conv1", 64, 2), FeatureInfo("conv2", 192, 4),
                FeatureInfo("inception3b", self.channels["3b"], 8), FeatureInfo("inception4d", self.channels["4d"], 16),
                FeatureInfo("inception5b", self.channels["5b"], 32)]
        return FeatureStages(stages, info)
