"""CIFAR ResNet-18, the RSLAD student.

The layout (and therefore every state-dict key) follows the kuangliu/pytorch-cifar ResNet that RSLAD copies
into ``cifar10_models/resnet.py`` (zibojia/RSLAD): ``conv1, bn1, layer1..layer4, linear``, each block with
``conv1, bn1, conv2, bn2, shortcut`` where ``shortcut`` is an ``nn.Sequential`` (empty for identity, else
``0`` = 1x1 conv, ``1`` = BN). Keeping the names lets checkpoints trained with the official code load
strictly into this model.
"""

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # kuangliu: a projection shortcut (1x1 conv + BN) only where the shape changes; an empty Sequential
        # otherwise, so identity blocks have no shortcut keys at all.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem and no max-pool (32x32 inputs are too small to downsample early),
    stages of 64/128/256/512 channels with strides 1/2/2/2, then ``avg_pool2d(out, 4)`` over the final 4x4
    map and a linear classifier — as in kuangliu/pytorch-cifar ``models/resnet.py``. No input normalization:
    RSLAD feeds images in [0, 1]."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)  # kuangliu: fixed 4x4 pooling, i.e. assumes 32x32 inputs
        return self.linear(out.flatten(1))


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2] (~11.17M parameters for 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes)


class ResNet8(nn.Module):
    """A small CIFAR ResNet for CPU-sized runs (the quick preset's teacher): a 3x3 stem, three stages of one
    BasicBlock each (strides 1/2/2), global average pooling, linear. Widths (16, 32, 64) make it He et al.'s
    CIFAR ResNet with n = 1 (depth 6n+2 = 8, ~78k parameters, ~12 MMACs per image); here the projection
    shortcuts are kuangliu's 1x1 conv + BN. Not from the RSLAD paper."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


def resnet8(num_classes: int = 10, widths=(16, 32, 64)) -> ResNet8:
    return ResNet8(widths, num_classes)
