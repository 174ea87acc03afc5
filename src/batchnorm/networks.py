"""The benchmark's networks, written out (no package has them for the CPU build of torch here).

``resnet20``: a CIFAR ResNet-20 (He et al. 2016, section 4.2). 3x3 convolutions without
bias, each followed by batch norm; ``F.relu`` after the first of each block and after the
residual add; stages of 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps, three blocks
each; a 1x1 convolution with batch norm on the shortcut where a stage begins (option B).

``vgg11``: VGG-11 (Simonyan & Zisserman 2015, configuration A) with batch norm after each
convolution and LeakyReLU(0.01), for 32x32 input: eight 3x3 convolutions of 64 to 512
channels, five 2x2 max pools, one linear classifier.

``resnet18``: torchvision's ResNet-18 (7x7 stem, max pool, stages of 64 to 512 channels,
BasicBlock with ``out += identity`` and one shared ReLU module), ``mobilenet_v2``:
MobileNetV2 (Sandler et al. 2018; ReLU6, inverted residuals ``x + conv(x)``) with the CIFAR
strides (the stem and the second stage keep the 32x32 map): the conversion benchmark's
models as users write them, torch's layers only.

``norm`` is the batch-norm class, torch's or this project's. With ``fused=True`` the
networks use BatchNormAct2d instead, written in by hand as a user would: BN + activation
(+ the residual add) is one module call. The state_dict keys are the same either way.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .activated import BatchNormAct2d


class BasicBlock(nn.Module):
    def __init__(self, norm: type[nn.Module], inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = norm(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = norm(outputs)
        self.shortcut = None
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), norm(outputs))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class FusedBasicBlock(nn.Module):
    """BasicBlock with relu(bn1(.)) and relu(bn2(.) + shortcut) each one BatchNormAct2d call."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = BatchNormAct2d(outputs, "relu")
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = BatchNormAct2d(outputs, "relu")
        self.shortcut = None
        if stride != 1 or inputs != outputs:
            conv = nn.Conv2d(inputs, outputs, 1, stride, bias=False)
            self.shortcut = nn.Sequential(conv, BatchNormAct2d(outputs, "identity"))

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(y), x if self.shortcut is None else self.shortcut(x))


def resnet20(norm: type[nn.Module] = nn.BatchNorm2d, classes: int = 10, blocks: int = 3, fused: bool = False):
    """ResNet-20 (blocks=3); ResNet-56 is blocks=9. ``fused``: BatchNormAct2d throughout."""
    if fused:
        stem = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), BatchNormAct2d(16, "relu"), nn.Identity()]
    else:
        stem = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU()]
    layers: list[nn.Module] = stem
    inputs = 16
    for outputs, stride in ((16, 1), (32, 2), (64, 2)):
        for k in range(blocks):
            s = stride if k == 0 else 1
            layers.append(FusedBasicBlock(inputs, outputs, s) if fused else BasicBlock(norm, inputs, outputs, s))
            inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    return nn.Sequential(*layers)


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(
    norm: type[nn.Module] = nn.BatchNorm2d, classes: int = 10, fused: bool = False, slope: float = 0.01,
    inplace: bool = False,
):  # fmt: skip
    """VGG-11 with batch norm and LeakyReLU(``slope``) for 32x32 input; ``fused``: each
    BN + LeakyReLU one BatchNormAct2d (an nn.Identity holds the activation's place), in-place
    activated batch norm with ``inplace``."""
    layers: list[nn.Module] = []
    inputs = 3
    for width in VGG11:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(inputs, width, 3, padding=1, bias=False))
        if fused:
            layers += [BatchNormAct2d(width, "leaky_relu", negative_slope=slope, inplace=inplace), nn.Identity()]
        else:
            layers += [norm(width), nn.LeakyReLU(slope)]
        inputs = width
    layers += [nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


class TorchvisionBasicBlock(nn.Module):
    """torchvision's BasicBlock: ``out += identity``, then the shared ``self.relu``."""

    def __init__(self, norm: type[nn.Module], inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = norm(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = norm(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), norm(outputs))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, norm: type[nn.Module] = nn.BatchNorm2d, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inputs = [], 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    TorchvisionBasicBlock(norm, inputs, outputs, stride),
                    TorchvisionBasicBlock(norm, outputs, outputs, 1),
                )
            )
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def resnet18(norm: type[nn.Module] = nn.BatchNorm2d, classes: int = 10) -> nn.Module:
    return ResNet18(norm, classes)


class InvertedResidual(nn.Module):
    def __init__(self, norm: type[nn.Module], inputs: int, outputs: int, stride: int, expand: int):
        super().__init__()
        hidden = inputs * expand
        self.use_residual = stride == 1 and inputs == outputs
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inputs, hidden, 1, bias=False), norm(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), norm(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, outputs, 1, bias=False), norm(outputs),
        ]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, channels, blocks, stride), CIFAR strides
MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(norm: type[nn.Module] = nn.BatchNorm2d, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), norm(32), nn.ReLU6(inplace=True)]
    inputs = 32
    for expand, outputs, count, stride in MOBILENET_V2:
        for k in range(count):
            layers.append(InvertedResidual(norm, inputs, outputs, stride if k == 0 else 1, expand))
            inputs = outputs
    layers += [nn.Conv2d(inputs, 1280, 1, bias=False), norm(1280), nn.ReLU6(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes))
