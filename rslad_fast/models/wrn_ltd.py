"""Chen2021LTD's WRN-34-20, AdaAD's CIFAR-10 teacher ("LTD": Chen et al. 2021, "LTD: Low Temperature Distillation
for Robust Adversarial Training"; boyellow/AdaAD README.md names it for CIFAR-10) and DGAD's alternative one
(kunsaram01/DGAD main.py:213-221, ``--teacher_model Chen2021LTD_WRD34_20``): DGAD main.py's default,
``--teacher_model wideresnet34_10`` (main.py:37), is TRADES' layout (its ``networks/wideresnet.py``
``WideResNet``), loaded from ``robust_teacher.pth['net']`` (main.py:208-211): ``wrn34-10`` here.

The published file is the RobustBench CIFAR-10 L-inf entry ``Chen2021LTD_WRN34_20``, which RobustBench builds as
``WideResNet(depth=34, widen_factor=20, sub_block1=False)`` (RobustBench/robustbench
``robustbench/model_zoo/cifar10.py``, the ``Chen2021LTD_WRN34_20`` entry) from
``robustbench/model_zoo/architectures/wide_resnet.py``; AdaAD loads the same file into the same network
(boyellow/AdaAD ``main.py``: ``Yao_WideResNet(num_classes=num_classes, depth=34, widen_factor=20,
sub_block1=False)``, ``networks/wideresnet.py``, after stripping the ``module.`` prefix of each key).
That network is TRADES' WideResNet (``wideresnet.py`` here) with two switches, both at the values above:
- ``sub_block1=False``: no ``sub_block1`` module at all (TRADES always builds it; its keys are absent here);
- ``bias_last=True`` (the default of both files): ``fc`` keeps its bias.
So the keys are ``conv1``, ``block{1,2,3}.layer.N.{bn1, conv1, bn2, conv2, convShortcut}``, ``bn1``, ``fc``;
the blocks are TRADES' (``wideresnet.BasicBlock``: pre-activation, the activated input feeds the 1x1
``convShortcut`` where the width changes), the head ``relu(bn1(.))`` -> 8x8 average pool -> ``fc``.

Normalization: none inside the model, as in the published one (``wide_resnet.py``'s ``forward`` starts with
``conv1(x)``): it takes images in [0, 1], and AdaAD feeds it ``ToTensor()`` images (``config/dataset_config.py``).

AdaAD's CIFAR-100 teacher, RobustBench's CIFAR-100 ``Chen2021LTD_WRN34_10``, is built with ``sub_block1=True``
(RobustBench ``cifar100.py``; AdaAD ``main.py``: ``Yao_WideResNet(..., depth=34, widen_factor=10,
sub_block1=True)``): that is TRADES' layout exactly, which ``wrn34-10`` loads.
"""

import torch.nn as nn
import torch.nn.functional as F

from .wideresnet import NetworkBlock, init_like_trades


class WideResNetLTD(nn.Module):
    """WRN-depth-widen_factor in RobustBench's ``WideResNet`` layout with ``sub_block1=False`` (see the module
    doc); ``depth=34, widen_factor=20`` is Chen2021LTD's WRN-34-20 (~184.5M parameters for 10 classes)."""

    def __init__(self, depth: int = 34, widen_factor: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]
        init_like_trades(self)  # wide_resnet.py's initialisation (TRADES')

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)  # wide_resnet.py: the final map is 8x8 for 32x32 inputs
        return self.fc(out.reshape(-1, self.n_channels))


def wrn34_20(num_classes: int = 10) -> WideResNetLTD:
    return WideResNetLTD(depth=34, widen_factor=20, num_classes=num_classes)
