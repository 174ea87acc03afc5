"""Real CNN definitions for the conversion tests, written here (torchvision and timm do not
install against the CPU build of torch): the wiring and activations of each family, with
small widths so that a float64 forward takes milliseconds.

    resnet18, resnet50   torchvision's BasicBlock / Bottleneck: conv-BN-ReLU, ``out += identity``,
                         a shared ``self.relu`` module, a downsample Sequential(conv, BN)
    mobilenet_v2         ReLU6, inverted residuals ``x + self.conv(x)`` ending in conv-BN
    mobilenet_v3         Hardswish, squeeze-excitation with Hardsigmoid, F.relu in places
    efficientnet_b0      SiLU, squeeze-excitation, stochastic depth left out, ``x + block(x)``
    densenet121          pre-activation BN-ReLU-conv on ``torch.cat`` of every earlier map
    regnet               conv-BN-ReLU stems, grouped bottlenecks, SE, ``F.relu(x + shortcut)``
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(inputs, outputs, kernel=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(outputs)
    )


class BasicBlock(nn.Module):
    def __init__(self, inputs, width, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _conv_bn(inputs, width, 1, stride) if stride != 1 or inputs != width else None

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inputs, width, stride=1):
        super().__init__()
        outputs = width * self.expansion
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(inputs, outputs, 1, stride) if stride != 1 or inputs != outputs else None

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, counts, width=8, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, inputs = [], width
        for k, count in enumerate(counts):
            blocks = []
            for j in range(count):
                blocks.append(block(inputs, width * 2**k, 2 if j == 0 and k > 0 else 1))
                inputs = width * 2**k * getattr(block, "expansion", 1)
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18():
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50():
    return ResNet(Bottleneck, [1, 2, 1, 1], width=4)


class InvertedResidual(nn.Module):
    def __init__(self, inputs, outputs, stride, expand):
        super().__init__()
        hidden = inputs * expand
        self.use_residual = stride == 1 and inputs == outputs
        self.conv = nn.Sequential(
            nn.Conv2d(inputs, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs),
        )  # fmt: skip

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


def mobilenet_v2():
    layers = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)]
    inputs = 8
    for outputs, stride in [(8, 1), (12, 2), (12, 1), (16, 2)]:
        layers.append(InvertedResidual(inputs, outputs, stride, 3))
        inputs = outputs
    layers += [nn.Conv2d(inputs, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed, gate=nn.Sigmoid, activation=nn.ReLU):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = activation()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MobileNetV3Block(nn.Module):
    def __init__(self, inputs, hidden, outputs, stride, use_se, hardswish):
        super().__init__()
        self.use_residual = stride == 1 and inputs == outputs
        self.hardswish = hardswish
        self.expand = nn.Conv2d(inputs, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(hidden // 4, 2), nn.Hardsigmoid) if use_se else nn.Identity()
        self.project = nn.Conv2d(hidden, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)

    def _act(self, x):
        return F.hardswish(x) if self.hardswish else F.relu(x)

    def forward(self, x):
        out = self._act(self.bn1(self.expand(x)))
        out = self.se(self._act(self.bn2(self.depthwise(out))))
        out = self.bn3(self.project(out))
        return out + x if self.use_residual else out


def mobilenet_v3():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
        MobileNetV3Block(8, 8, 8, 1, True, False),
        MobileNetV3Block(8, 24, 12, 2, False, False),
        MobileNetV3Block(12, 36, 12, 1, True, True),
        nn.Conv2d(12, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    )  # fmt: skip


class MBConv(nn.Module):
    def __init__(self, inputs, outputs, stride, expand):
        super().__init__()
        hidden = inputs * expand
        self.use_residual = stride == 1 and inputs == outputs
        self.block = nn.Sequential(
            nn.Conv2d(inputs, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.SiLU(),
            SqueezeExcite(hidden, max(inputs // 4, 2), nn.Sigmoid, nn.SiLU),
            nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs),
        )  # fmt: skip

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


def efficientnet_b0():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
        MBConv(8, 8, 1, 1), MBConv(8, 12, 2, 4), MBConv(12, 12, 1, 4),
        nn.Conv2d(12, 40, 1, bias=False), nn.BatchNorm2d(40), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10),
    )  # fmt: skip


class DenseLayer(nn.Module):
    def __init__(self, inputs, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(inputs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inputs, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, count, inputs, growth):
        super().__init__()
        for k in range(count):
            self.add_module(f"denselayer{k + 1}", DenseLayer(inputs + k * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def densenet121():
    growth, channels = 4, 8
    parts = [nn.Conv2d(3, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    for k, count in enumerate([3, 2]):
        parts.append(DenseBlock(count, channels, growth))
        channels += count * growth
        if k == 0:
            transition = nn.Conv2d(channels, channels // 2, 1, bias=False)
            parts += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), transition, nn.AvgPool2d(2)]
            channels //= 2
    parts += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*parts, nn.Linear(channels, 10))


class RegNetBlock(nn.Module):
    def __init__(self, inputs, outputs, stride, group_width=4):
        super().__init__()
        self.a = nn.Sequential(*_conv_bn(inputs, outputs, 1), nn.ReLU(inplace=True))
        self.b = nn.Sequential(*_conv_bn(outputs, outputs, 3, stride, outputs // group_width), nn.ReLU(inplace=True))
        self.se = SqueezeExcite(outputs, max(inputs // 4, 2))
        self.c = _conv_bn(outputs, outputs, 1)
        self.shortcut = _conv_bn(inputs, outputs, 1, stride) if stride != 1 or inputs != outputs else None

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.c(self.se(self.b(self.a(x)))) + shortcut)


def regnet():
    return nn.Sequential(
        nn.Sequential(*_conv_bn(3, 8, 3, 2), nn.ReLU(inplace=True)),
        RegNetBlock(8, 8, 1), RegNetBlock(8, 16, 2), RegNetBlock(16, 16, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


# name -> (constructor, batch norms, fused layers convert makes: (activation, with a residual) counts)
ZOO = {
    "resnet18": (resnet18, 20, {("relu", False): 9, ("relu", True): 8}),
    "resnet50": (resnet50, 20, {("relu", False): 11, ("relu", True): 5}),
    "mobilenet_v2": (mobilenet_v2, 14, {("identity", True): 2}),
    "mobilenet_v3": (mobilenet_v3, 11, {("relu", False): 4, ("identity", True): 2}),
    "efficientnet_b0": (efficientnet_b0, 11, {("silu", False): 8, ("identity", True): 2}),
    "densenet121": (densenet121, 13, {("relu", False): 13}),
    "regnet": (regnet, 11, {("relu", False): 7, ("relu", True): 3}),
}
