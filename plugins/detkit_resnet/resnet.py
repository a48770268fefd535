"""Deep residual networks (He et al. 2016, "Deep Residual Learning for Image Recognition").

ResNet-18/34 use basic blocks (two 3x3 convs), ResNet-50/101/152 bottleneck
blocks (1x1 reduce, 3x3, 1x1 expand x4), in four stages conv2_x..conv5_x
(Table 1). Parameter names follow torchvision, so its checkpoints load as they
are. The paper's bottleneck puts the stride-2 on the first 1x1 convolution
(``stride_in_1x1=True``, the default, giving the paper's FLOPs); torchvision's
checkpoints were trained with the stride on the 3x3 ("v1.5",
``stride_in_1x1=False``): the parameters are the same, the function differs.

Detection (ResNet paper Appendix A, Detectron's C4): the trunk is conv1..conv4_x
(stride 16), the RoI head is conv5_x plus global average pooling on 14x14 pooled
features.
"""
from __future__ import annotations

from torch import Tensor, nn

from detkit.backbones import Backbone, BackboneDefaults, DetectionParts


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = True):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = True):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, planes, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000,
                 stride_in_1x1: bool = True):
        super().__init__()
        self.defaults = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=14)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, stride_in_1x1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, stride_in_1x1)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, stride_in_1x1)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, stride_in_1x1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.expansion = block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, stride_in_1x1: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Option B: projection shortcuts only where dimensions change.
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, stride_in_1x1)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, stride_in_1x1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def detection_parts(self) -> DetectionParts:
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        stages = [stem, self.layer1, self.layer2, self.layer3]
        return DetectionParts(trunk=nn.Sequential(*stages),
                              roi_head=nn.Sequential(self.layer4, self.avgpool, nn.Flatten(1)),
                              out_channels=256 * self.expansion, stride=16, head_channels=512 * self.expansion,
                              stages=stages)


def resnet18(num_classes: int = 1000, stride_in_1x1: bool = True) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, stride_in_1x1)


def resnet34(num_classes: int = 1000, stride_in_1x1: bool = True) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, stride_in_1x1)


def resnet50(num_classes: int = 1000, stride_in_1x1: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, stride_in_1x1)


def resnet101(num_classes: int = 1000, stride_in_1x1: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, stride_in_1x1)


def resnet152(num_classes: int = 1000, stride_in_1x1: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, stride_in_1x1)


VARIANTS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
            "resnet152": resnet152}
