"""A CIFAR ResNet-20 (He et al. 2016, section 4.2), for the benchmark's model step.

3x3 convolutions without bias, each followed by batch norm; ``F.relu`` after the first of
each block and after the residual add; stages of 16, 32 and 64 channels on 32x32, 16x16 and
8x8 maps, three blocks each; a 1x1 convolution with batch norm on the shortcut where a
stage begins (option B). ``norm`` is the batch-norm class: torch's or this project's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


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


def resnet20(norm: type[nn.Module], classes: int = 10, blocks: int = 3) -> nn.Sequential:
    """ResNet-20 (blocks=3); ResNet-56 is blocks=9."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU()]
    inputs = 16
    for outputs, stride in ((16, 1), (32, 2), (64, 2)):
        for k in range(blocks):
            layers.append(BasicBlock(norm, inputs, outputs, stride if k == 0 else 1))
            inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    return nn.Sequential(*layers)
