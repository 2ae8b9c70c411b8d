"""The CIFAR model zoo: one name -> one architecture, built fresh (weights come from ``loading.py``).

Canonical names (``ARCHS``):
- ``resnet18``  CIFAR ResNet-18 (RSLAD student; kuangliu layout)
- ``mnv2``      CIFAR MobileNetV2 (RSLAD student; kuangliu layout)
- ``wrn34-10``  TRADES WRN-34-10 (RSLAD teacher; loads TRADES' ``model_cifar_wrn.pt`` strictly)
- ``wrn70-16``  DeepMind WRN-70-16 (RobustBench layout, normalizes internally; the RSLAD CIFAR-100 teacher)
- ``wrn34-20``  Chen2021LTD's WRN-34-20 (AdaAD's CIFAR-10 teacher, DGAD's alternative one: DGAD main.py's default
  is TRADES' layout, ``wrn34-10``; RobustBench ``WideResNet`` with no ``sub_block1``, raw [0, 1] input;
  ``models/wrn_ltd.py``)
- ``dm-wrn28-10``, ``dm-wrn70-16``  RobustBench's DeepMind WRNs (Gowal 2020/2021, Rebuffi 2021, Wang 2023; Swish /
  SiLU), normalizing internally with the constants RobustBench publishes for the data set (``models/wrn_dm.py``)
- ``resnet56``  CIFAR ResNet-56 (MTARD's natural CIFAR-10 teacher; MTARD / chenyaofo layout, raw [0, 1] input)
- ``resnet8``   a small CIFAR ResNet (He et al.'s n = 1, ~78k parameters): the quick preset's CPU teacher
- ``tiny``      a ~5k-parameter CNN for tests and CPU demos; not from any paper

Every model takes its class count from the data set (``build(name, num_classes)``: 10 for CIFAR-10, 100 for
CIFAR-100; the engine and ``evaluate`` always pass it).

Names are matched case-insensitively, ignoring ``-``, ``_``, ``.`` and spaces, so ``ResNet-18``,
``resnet_18``, ``rn18``, ``MobileNet_V2``, ``WRN_34_10`` and ``wideresnet70-16`` all work.
"""

import operator

import torch.nn as nn

from rslad_fast.errors import UserError

from .fold import FoldedCopy, fold_bn
from .mobilenetv2 import mobilenet_v2
from .resnet import resnet8, resnet18
from .resnet56 import resnet56
from .wideresnet import wrn34_10
from .wrn_dm import dm_wrn, wrn70_16
from .wrn_ltd import wrn34_20

ARCHS = (
    "resnet18",
    "mnv2",
    "wrn34-10",
    "wrn70-16",
    "wrn34-20",
    "dm-wrn28-10",
    "dm-wrn70-16",
    "resnet56",
    "resnet8",
    "tiny",
)
# WRN-70-16's input normalizations (models/wrn_dm.py NORMALIZATIONS), the default first
WRN70_NORMS = ("cifar10", "cifar100")

# normalized alias -> canonical name (see _norm for the normalization)
_ALIASES = {
    "resnet18": "resnet18",
    "rn18": "resnet18",
    "res18": "resnet18",
    "mnv2": "mnv2",
    "mobilenetv2": "mnv2",
    "mobilenet2": "mnv2",
    "mbv2": "mnv2",
    "wrn3410": "wrn34-10",
    "wideresnet3410": "wrn34-10",
    "wideresnet34": "wrn34-10",
    "wrn7016": "wrn70-16",
    "wideresnet7016": "wrn70-16",
    "wrn3420": "wrn34-20",
    "wideresnet3420": "wrn34-20",
    "ltdwrn3420": "wrn34-20",
    "chen2021ltdwrn3420": "wrn34-20",
    "dmwrn2810": "dm-wrn28-10",
    "dmwideresnet2810": "dm-wrn28-10",
    "dmwrn7016": "dm-wrn70-16",
    "dmwideresnet7016": "dm-wrn70-16",
    "resnet56": "resnet56",
    "rn56": "resnet56",
    "res56": "resnet56",
    "resnet8": "resnet8",
    "rn8": "resnet8",
    "res8": "resnet8",
    "tiny": "tiny",
    "tinycnn": "tiny",
}


class TinyCNN(nn.Module):
    """Two conv+BN+ReLU layers, global average pool, linear (~5.5k parameters for 10 classes).

    Exists so tests and CPU demos exercise the full training/attack code path in milliseconds. Global
    pooling (not a fixed 4x4 pool) lets it take any input size."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        return self.linear(out.mean(dim=(2, 3)))


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "-_. ")


def canonical_name(name: str) -> str:
    """Map any accepted spelling to its canonical name; UserError for an unknown architecture."""
    canon = _ALIASES.get(_norm(name)) if isinstance(name, str) else None
    if canon is None:
        raise UserError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}")
    return canon


def build(name: str, num_classes: int = 10, *, normalization: str = "cifar10") -> nn.Module:
    """Build a freshly initialised model of architecture ``name`` with ``num_classes`` outputs (the data set's
    class count). ``normalization``: the mean/std ``wrn70-16`` normalizes its input with (``WRN70_NORMS``); the
    other architectures ignore it (``dm-wrn28-10`` / ``dm-wrn70-16`` normalize with the constants RobustBench
    publishes for their class count's data set, the rest take raw [0, 1] inputs).

    Imports are local so that building the tiny model does not pay for importing every architecture."""
    canon = canonical_name(name)
    try:  # operator.index accepts ints and numpy integers but not floats or strings
        n = None if isinstance(num_classes, bool) else operator.index(num_classes)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = n
    if normalization not in WRN70_NORMS:
        raise UserError(f"unknown WRN-70-16 normalization {normalization!r}; choose one of: {', '.join(WRN70_NORMS)}")
    if canon == "resnet18":
        return resnet18(num_classes)
    if canon == "mnv2":
        return mobilenet_v2(num_classes)
    if canon == "resnet56":
        return resnet56(num_classes)
    if canon == "resnet8":
        return resnet8(num_classes)
    if canon == "wrn34-10":
        return wrn34_10(num_classes)
    if canon == "wrn70-16":
        return wrn70_16(num_classes, normalization)
    if canon == "wrn34-20":
        return wrn34_20(num_classes)
    if canon == "dm-wrn28-10":
        return dm_wrn(28, 10, num_classes)
    if canon == "dm-wrn70-16":
        return dm_wrn(70, 16, num_classes)
    return TinyCNN(num_classes)


__all__ = ["ARCHS", "WRN70_NORMS", "FoldedCopy", "TinyCNN", "build", "canonical_name", "fold_bn"]
