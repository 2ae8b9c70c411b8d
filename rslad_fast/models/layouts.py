"""What layout a state dict has, in words: for the one-line error of a checkpoint loaded into the wrong
architecture ("found ..., expected ...").

- :func:`matching_archs`: the architectures of ``models.ARCHS`` whose state dict has exactly these keys and
  shapes, the classifier's output count aside (each built once on the ``meta`` device: no memory, no init).
- :func:`describe`: the family the keys belong to, with its depth / width read off the keys and shapes (the
  published layouts this project loads: TRADES' / RobustBench's ``WideResNet``, DeepMind's ``DMWideResNet`` and
  ``DMPreActResNet``, kuangliu's ResNet and MobileNetV2, torchvision's / chenyaofo's CIFAR ResNet), its class
  count, and the matching architecture names; for keys of no known family, the top-level modules and the count.
"""

from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

import torch

_HEADS = ("fc", "logits", "linear")  # the classifier's name in each known layout
_SHOWN = 6


def _shapes(sd: dict) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}


def _head(shapes: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    for name in _HEADS:
        if len(shapes.get(f"{name}.weight", ())) == 2:
            return name
    return None


@functools.lru_cache(maxsize=None)
def _arch_shapes(arch: str) -> Dict[str, Tuple[int, ...]]:
    from . import build  # models/__init__ imports this package's modules; build is there

    with torch.device("meta"):
        return _shapes(build(arch, 10).state_dict())


def _same_up_to_classes(a: Dict[str, Tuple[int, ...]], b: Dict[str, Tuple[int, ...]]) -> bool:
    if a.keys() != b.keys():
        return False
    head = _head(a)
    for k, shape in a.items():
        if head and k in (f"{head}.weight", f"{head}.bias"):
            if shape[1:] != b[k][1:]:
                return False
        elif shape != b[k]:
            return False
    return True


def matching_archs(sd: dict) -> List[str]:
    """The names of ``models.ARCHS`` whose state dict has ``sd``'s keys and shapes (any class count)."""
    from . import ARCHS

    shapes = _shapes(sd)
    return [a for a in ARCHS if _same_up_to_classes(shapes, _arch_shapes(a))]


def _indices(keys, pattern: str) -> List[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def _family(shapes: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    keys = set(shapes)
    if "init_conv.weight" in keys and "layer.0.block.0.conv_0.weight" in keys:
        n = len(_indices(keys, r"layer\.0\.block\.(\d+)\."))
        width = shapes["layer.0.block.0.conv_0.weight"][0] // 16
        return f"DeepMind's DMWideResNet WRN-{6 * n + 4}-{width} (init_conv, layer.I.block.K.conv_0, logits)"
    if "conv_2d.weight" in keys and "layer_0.0.conv_2d_1.weight" in keys:
        blocks = [len(_indices(keys, rf"layer_{i}\.(\d+)\.")) for i in range(4)]
        return f"DeepMind's DMPreActResNet-{2 * sum(blocks) + 2} (conv_2d, layer_I.K.conv_2d_1, logits)"
    if "block1.layer.0.conv1.weight" in keys:
        n = len(_indices(keys, r"block1\.layer\.(\d+)\."))
        width = shapes["block1.layer.0.conv1.weight"][0] // 16
        sub = "with" if "sub_block1.layer.0.conv1.weight" in keys else "without"
        bias = "" if "fc.bias" in keys else ", no fc bias"
        return f"TRADES' / RobustBench's WideResNet WRN-{6 * n + 4}-{width} {sub} sub_block1{bias} (blockI.layer.K)"
    if "layers.0.conv1.weight" in keys and "linear.weight" in keys:
        blocks = len(_indices(keys, r"layers\.(\d+)\."))
        return f"kuangliu's MobileNetV2 ({blocks} blocks under layers.K)"
    stages = len(_indices(keys, r"layer(\d+)\."))
    if "layer1.0.conv1.weight" in keys and stages:
        blocks = [len(_indices(keys, rf"layer{i}\.(\d+)\.")) for i in range(1, stages + 1)]
        bottleneck = "layer1.0.conv3.weight" in keys
        depth = (3 if bottleneck else 2) * sum(blocks) + 2
        if "fc.weight" in keys and any(".downsample." in k for k in keys):
            kind = "CIFAR ResNet" if stages == 3 else "ResNet"
            return f"torchvision's / chenyaofo's {kind}-{depth} (layerI.K, downsample, fc)"
        if "linear.weight" in keys:
            return f"kuangliu's ResNet-{depth} (layerI.K, shortcut, linear)"
    if "layer1.conv1.weight" in keys and "linear.weight" in keys:
        return "this project's ResNet-8 (layerI.conv1, linear)"
    return None


def describe(sd: dict, archs: bool = True) -> str:
    """The layout of ``sd`` in a few words: its family, depth and width, class count and (``archs``) the
    names of the architectures that load it (see the module doc)."""
    shapes = _shapes(sd)
    names = matching_archs(sd)
    family = _family(shapes)
    if family is None and names:
        family = f"this project's {names[0]!r} layout"
    elif family is None:
        tops = sorted({k.split(".", 1)[0] for k in shapes})
        more = f", ... ({len(tops)} in all)" if len(tops) > _SHOWN else ""
        family = f"an unrecognized layout (top-level {', '.join(tops[:_SHOWN])}{more}; {len(shapes)} tensors)"
    head = _head(shapes)
    classes = f", {shapes[f'{head}.weight'][0]} classes" if head else ""
    arch = f", the layout of architecture {' / '.join(repr(a) for a in names)}" if names and archs else ""
    return f"{family}{classes}{arch}"


__all__ = ["describe", "matching_archs"]
