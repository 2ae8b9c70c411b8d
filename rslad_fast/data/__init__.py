"""CIFAR-10 / CIFAR-100 data layer: readers of the official files, train-time augmentation, GPU-resident loaders.

Loaders by name in factory.py (:func:`make_loader`); NVIDIA DALI (``nvidia.dali``) is imported only when a DALI
pipeline is built, never here.
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
from .cifar import DATASETS, NAMES, load_cifar, load_cifar10, load_cifar100, num_classes
from .factory import KINDS, make_loader
from .loaders import TensorLoader, dali_available, epoch_indices

__all__ = [
    "CropFlipParams",
    "DATASETS",
    "KINDS",
    "NAMES",
    "TensorLoader",
    "apply_crop_flip",
    "dali_available",
    "decode_views",
    "epoch_indices",
    "load_cifar",
    "load_cifar10",
    "load_cifar100",
    "make_loader",
    "num_classes",
    "num_views",
    "random_crop_flip",
    "sample_crop_flip_params",
    "view_ids",
]
