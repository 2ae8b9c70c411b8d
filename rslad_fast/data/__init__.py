"""CIFAR-10 data layer: reader of the official files, train-time augmentation, GPU-resident loaders.

DALI (``rslad_fast.data.dali``) is imported lazily by :func:`make_loader`, never here.
"""

from .augment import (
    CropFlipParams,
    apply_crop_flip,
    decode_views,
    num_views,
    random_crop_flip,
    sample_crop_flip_params,
    view_ids,
)
from .cifar import load_cifar10
from .loaders import KINDS, TensorLoader, dali_available, epoch_indices, make_loader

__all__ = [
    "CropFlipParams",
    "KINDS",
    "TensorLoader",
    "apply_crop_flip",
    "dali_available",
    "decode_views",
    "epoch_indices",
    "load_cifar10",
    "make_loader",
    "num_views",
    "random_crop_flip",
    "sample_crop_flip_params",
    "view_ids",
]
