"""TRADES WideResNet (WRN-34-10), the RSLAD teacher.

RSLAD distills from TRADES' released ``model_cifar_wrn.pt`` (yaodongyu/TRADES, ``models/wideresnet.py``;
copied by zibojia/RSLAD as ``cifar10_models/wideresnet.py``). To load that file strictly this module keeps
TRADES' exact key names, including its oddities:
- ``sub_block1`` is built (same shape as ``block1``) but never used in ``forward``; its weights are in the
  released checkpoint, so dropping it would break strict loading. Hence the module holds 48.26M
  parameters, of which the usual "46.16M" (WRN-34-10 without ``sub_block1``) take part in ``forward``;
- blocks are ``blockK.layer.N.{bn1, relu1, conv1, bn2, relu2, conv2, convShortcut}``; ``convShortcut`` exists
  only where the channel count changes;
- no input normalization: the model takes images in [0, 1].
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Pre-activation block. When the channel count changes, TRADES pre-activates ``x`` itself and feeds the
    activated tensor to both the conv path and the 1x1 ``convShortcut``; otherwise the identity carries the
    raw ``x``. ReLUs are not in-place (TRADES uses ``inplace=True``; results are identical and out-of-place
    is safer for input-gradient attacks and double backward)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equal_in_out else self.convShortcut(act), out)


def init_like_trades(model: nn.Module) -> None:
    """TRADES' wide_resnet.py initialisation: He-normal over fan-out for convolutions, BatchNorm to identity,
    zero linear bias (the linear weight keeps PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class NetworkBlock(nn.Module):
    """A stage of ``n`` blocks under the attribute ``layer`` (TRADES' name, part of the keys)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor in TRADES' layout; ``depth=34, widen_factor=10`` is the RSLAD teacher."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)  # TRADES: unused in forward, kept for keys
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]
        # TRADES' initialisation, so a teacher trained from scratch here starts like the official one
        init_like_trades(self)

    def forward(self, x):
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)  # TRADES: final map is 8x8 for 32x32 inputs
        return self.fc(out.reshape(-1, self.n_channels))


def wrn34_10(num_classes: int = 10) -> WideResNet:
    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes)
