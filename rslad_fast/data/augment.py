"""Vectorized train-time augmentation: random crop with zero padding, then horizontal flip.

The official RSLAD code (github.com/zibojia/RSLAD, ``resnet18_rslad_cifar10.py``) trains with::

    transforms.Compose([transforms.RandomCrop(32, padding=4),
                        transforms.RandomHorizontalFlip(),
                        transforms.ToTensor()])          # no normalization

torchvision draws, per image, ``top, left ~ randint(0, 2*padding + 1)`` (uniform over 0..8 for padding 4)
on the zero-padded image, then flips with p = 0.5. We reproduce exactly that distribution, but for a
whole uint8 batch at once on its own device (one pad + one gather, no Python loop over images), so the
GPU-resident loader never round-trips through PIL or the host.

Sampling and application are split (:func:`sample_crop_flip_params`, :func:`apply_crop_flip`) so tests can
check the drawn offsets and the pixels against each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropFlipParams:
    """Per-image crop window and flip. ``top``/``left`` index the *padded* image (0..2*padding)."""

    top: torch.Tensor  # int64 [B]
    left: torch.Tensor  # int64 [B]
    flip: torch.Tensor  # bool [B]
    padding: int


def sample_crop_flip_params(n: int, generator: torch.Generator, padding: int = 4,
                            device: torch.device | str | None = None) -> CropFlipParams:
    """Draw offsets uniform over 0..2*padding per axis and flips with p = 0.5, as torchvision does.

    ``generator`` must live on ``device`` (torch requires it); draws happen in a fixed order
    (top, left, flip) so a seeded generator gives the same params on every run.
    """
    device = torch.device(device) if device is not None else generator.device
    hi = 2 * padding + 1
    top = torch.randint(0, hi, (n,), generator=generator, device=device)
    left = torch.randint(0, hi, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return CropFlipParams(top=top, left=left, flip=flip, padding=padding)


def apply_crop_flip(images: torch.Tensor, params: CropFlipParams) -> torch.Tensor:
    """Crop each image of ``images`` [B, C, H, W] at its window of the zero-padded batch, then flip.

    Output has the input's shape and dtype. Implemented as a single advanced-indexing gather into the
    padded batch: row index ``top + i``, column ``left + j`` (or ``left + W-1-j`` when flipped), so the
    flip costs nothing extra.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = params.padding
    padded = F.pad(images, (p, p, p, p)) if p > 0 else images  # zero fill, any dtype
    dev = images.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = params.top.to(dev)[:, None] + ar_h  # [B, H]
    cols_fwd = ar_w.expand(b, w)
    cols = torch.where(params.flip.to(dev)[:, None], (w - 1) - cols_fwd, cols_fwd) + params.left.to(dev)[:, None]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """``RandomCrop(H, padding)`` + ``RandomHorizontalFlip()`` for a whole batch (see module doc)."""
    params = sample_crop_flip_params(images.shape[0], generator, padding, images.device)
    return apply_crop_flip(images, params)
