"""DeepMind WideResNets: WRN-70-16 (RSLAD's CIFAR-100 teacher) and the RobustBench DM WRN-28-10 / WRN-70-16.

Semantics follow RobustBench's ``DMWideResNet`` (RobustBench/robustbench,
``robustbench/model_zoo/architectures/dm_wide_resnet.py``, itself a port of deepmind-research
``adversarial_robustness/pytorch/model_zoo.py``), so the public DeepMind / RobustBench checkpoints (e.g.
Gowal et al. 2020, WRN-70-16) load strictly:
- keys ``init_conv``, ``layer.{0,1,2}.block.K.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}``,
  ``batchnorm``, ``logits``;
- Swish (x * sigmoid(x)) activations;
- TensorFlow "SAME" padding emulated by hand: ``conv_0`` has padding 0 and its input is padded
  ``(1,1,1,1)`` at stride 1 and asymmetrically ``(0,1,0,1)`` at stride 2 (TF pads right/bottom only);
- input normalization inside ``forward`` with a fixed mean/std. Here they are NON-persistent buffers:
  they are constants of the architecture, not learned weights, so they stay out of our state dicts
  (``loading.py`` drops matching ``mean``/``std`` entries found in RobustBench files).

Which mean/std (``NORMALIZATIONS``, ``normalization=``): ``cifar10``, the default, is what the official
RSLAD code builds its CIFAR-100 teacher with (zibojia/RSLAD ``cifar100_models/wideresnet.py``:
``WideResNet_70_16()`` passes ``mean=CIFAR10_MEAN, std=CIFAR10_STD`` with ``num_classes=100``), so it is
the faithful choice on both data sets; ``cifar100`` is the CIFAR-100 mean/std the same file defines and
DeepMind's own model zoo normalizes its CIFAR-100 models with (deepmind-research
``adversarial_robustness/pytorch``). The state dict is the same either way; only the logits differ.

The RobustBench DM entries (``dm-wrn28-10``, ``dm-wrn70-16`` in ``models.ARCHS``: :func:`dm_wrn`) are the same
network at depth 28 / 70 and width 10 / 16, as RobustBench builds the teachers of the post-RSLAD literature
(RobustBench/robustbench ``robustbench/model_zoo/cifar10.py`` and ``cifar100.py``: ``DMWideResNet(num_classes,
depth, width, activation_fn=Swish or nn.SiLU, mean, std)`` for Gowal2020Uncovering_28_10_extra /
_70_16(_extra), Gowal2021Improving_28_10_ddpm_100m / _70_16_ddpm_100m, Rebuffi2021Fixing_28_10_cutmix_ddpm /
_70_16_cutmix_ddpm, Wang2023Better_WRN-28-10 / WRN-70-16). Swish (Gowal, Rebuffi) and ``nn.SiLU`` (Wang2023)
are the same function with no parameters, so one module serves both and the keys are the same. Their
normalization is the one RobustBench publishes with each file, inside the model: ``CIFAR10_MEAN/STD`` for every
CIFAR-10 entry, ``CIFAR100_MEAN/STD`` for every CIFAR-100 entry (the constants of
``robustbench/model_zoo/architectures/dm_wide_resnet.py``, equal to the ones below). So a ``dm-*`` model
normalizes with its data set's constants (chosen by the class count, :data:`PUBLISHED_NORMALIZATION`) and
ignores ``--wrn70-16-norm``; ``wrn70-16`` keeps RSLAD's choice above.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# normalization name -> (mean, std); the first is the default (see the module docstring)
NORMALIZATIONS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
# the RobustBench DM entries' normalization by class count: CIFAR-10 files (cifar10.py) normalize with the
# CIFAR-10 constants, CIFAR-100 files (cifar100.py) with the CIFAR-100 ones; any other count gets
# DMWideResNet's default (dm_wide_resnet.py: mean=CIFAR10_MEAN, std=CIFAR10_STD)
PUBLISHED_NORMALIZATION = {10: "cifar10", 100: "cifar100"}


class Swish(nn.SiLU):
    """Swish = x * sigmoid(x). DeepMind/RobustBench use a custom autograd Function with the same forward and
    analytic gradient; ``nn.SiLU`` computes the same thing with a fused kernel."""


class _Block(nn.Module):
    """Pre-activation block. Like TRADES, when the channel count changes the *activated* input feeds both
    ``conv_0`` and the 1x1 ``shortcut``; otherwise the identity carries the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = Swish()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = Swish()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = None
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        act = self.relu_0(self.batchnorm_0(x))
        pad = (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)  # TF "SAME" for a 3x3 kernel
        out = self.conv_0(F.pad(act, pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(act) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    """``num_blocks`` blocks under ``block`` (part of the keys); only the first changes stride/width."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            *[
                _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(num_blocks)
            ]
        )

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-depth-width in DeepMind's layout; ``depth=70, width=16`` is WRN-70-16 (~266.9M parameters).

    Takes images in [0, 1] and normalizes internally, so it is a drop-in teacher next to the TRADES WRN."""

    def __init__(self, num_classes: int = 10, depth: int = 70, width: int = 16, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"DMWideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, ch[0], ch[1], 1),
            _BlockGroup(n, ch[1], ch[2], 2),
            _BlockGroup(n, ch[2], ch[3], 2),
        )
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = Swish()
        self.logits = nn.Linear(ch[3], num_classes)
        self.num_channels = ch[3]

    def forward(self, x):
        out = self.init_conv((x - self.mean) / self.std)
        out = self.layer(out)
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, 8)  # final map is 8x8 for 32x32 inputs
        return self.logits(out.reshape(-1, self.num_channels))


def wrn70_16(num_classes: int = 10, normalization: str = "cifar10") -> DMWideResNet:
    mean, std = NORMALIZATIONS[normalization]
    return DMWideResNet(num_classes=num_classes, depth=70, width=16, mean=mean, std=std)


def dm_wrn(depth: int, width: int, num_classes: int = 10) -> DMWideResNet:
    """RobustBench's DM WRN-depth-width with the normalization RobustBench publishes for a model of
    ``num_classes`` classes (:data:`PUBLISHED_NORMALIZATION`)."""
    mean, std = NORMALIZATIONS[PUBLISHED_NORMALIZATION.get(num_classes, "cifar10")]
    return DMWideResNet(num_classes=num_classes, depth=depth, width=width, mean=mean, std=std)
