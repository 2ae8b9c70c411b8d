"""CIFAR ResNet-56, MTARD's natural (clean-trained) CIFAR-10 teacher.

Layout: MTARD (zhaoshiji123/MTARD) ``cifar10_nat_teacher_models/resnet.py``, itself chenyaofo/pytorch-cifar-models'
``CifarResNet`` (torchvision's ResNet adapted to CIFAR), so that MTARD's and chenyaofo's released files load
strictly:
- keys ``conv1``, ``bn1``, ``layer{1,2,3}.K.{conv1, bn1, conv2, bn2}``, ``layer{2,3}.0.downsample.{0 (1x1 conv),
  1 (BN)}``, ``fc``; no bias in any conv;
- He et al.'s CIFAR ResNet with depth 6n+2: a 3x3 stem of 16 channels, three stages of n post-activation
  BasicBlocks (16/32/64 channels, strides 1/2/2), global average pooling, linear. ResNet-56 is n = 9
  (``resnet56``: ``layers=[9]*3`` in the same file, ~0.86M parameters for 10 classes);
- a projection ``downsample`` only where the shape changes (the first block of stages 2 and 3); identity
  shortcuts otherwise (no shortcut keys at all).

Normalization: none inside the model. MTARD feeds its teachers images in [0, 1]
(``mtard/mtard_resnet18_cifar10.py``: ``transform_train`` / ``transform_test`` are ``ToTensor()`` only, and
``teacher_nat(train_batch_data)`` is called on them), so this model takes raw [0, 1] inputs too. (chenyaofo's
own ImageNet-style training normalizes in the data pipeline; a file trained that way would need its inputs
normalized outside, which MTARD does not do.)
"""

import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)); ``downsample`` (1x1 conv + BN) where the shape
    changes (MTARD ``resnet.py`` ``BasicBlock`` / ``_make_layer``)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2 in MTARD's / chenyaofo's key layout (see the module doc)."""

    def __init__(self, n: int = 9, num_classes: int = 10):
        super().__init__()
        widths = (16, 32, 64)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_Block(in_planes, width, stride if i == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
        # MTARD resnet.py's initialisation: He-normal over fan-out for convs, BN to identity (Linear: default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))  # MTARD: AdaptiveAvgPool2d((1, 1)), view


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56: n = 9 blocks per stage (MTARD resnet.py: ``zip([[3]*3, [5]*3, [7]*3, [9]*3], [..., "resnet56"])``)."""
    return CifarResNet(9, num_classes)
