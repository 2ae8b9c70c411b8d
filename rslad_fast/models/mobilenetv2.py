"""CIFAR MobileNetV2, the second RSLAD student.

Follows the kuangliu/pytorch-cifar MobileNetV2 that RSLAD ships as ``cifar10_models/mobilenet_v2.py``
(zibojia/RSLAD), including its CIFAR changes and quirks, so official checkpoints load strictly and the
parameter count (~2.30M) matches the paper's student:
- ``conv1`` has stride 1 and the cfg row ``(6, 24, 2, 1)`` has stride 1 (ImageNet uses 2 for both);
- a block adds a shortcut only when its stride is 1; that shortcut is a 1x1 conv + BN when the channel
  count changes (the ImageNet design has no residual there at all);
- the head is a 1x1 conv 320 -> 1280, BN, ReLU and ``avg_pool2d(out, 4)``.
"""

import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Inverted residual: expand (1x1) -> depthwise (3x3) -> project (1x1, linear)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:  # kuangliu: projection shortcut, even at expansion 1
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (kuangliu layout: ``conv1, bn1, layers.N, conv2, bn2, linear``)."""

    # (expansion, out_planes, num_blocks, stride); row 2 stride 1 is kuangliu's CIFAR change.
    cfg = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layers = self._make_layers(in_planes=32)
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def _make_layers(self, in_planes: int) -> nn.Sequential:
        layers = []
        for expansion, out_planes, num_blocks, stride in self.cfg:
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(Block(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)  # kuangliu: 7 -> 4 for 32x32 inputs (final map is 4x4)
        return self.linear(out.flatten(1))


def mobilenet_v2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes)
