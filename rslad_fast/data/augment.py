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

A *view* is one of the ``(2p+1)^2 * 2`` outcomes of the augmentation of one image (162 for p = 4): the
frozen teacher's logits are a function of (image, view) alone, which is what the teacher-logit cache
(``engine/teacher_cache.py``) keys on. :func:`view_ids` numbers them, :func:`decode_views` inverts it.
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


def sample_crop_flip_params(
    n: int, generator: torch.Generator, padding: int = 4, device: torch.device | str | None = None
) -> CropFlipParams:
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


def num_views(padding: int = 4) -> int:
    """The distinct outcomes of one image's crop and flip: (2p+1)^2 offsets x 2 flips (162 for p = 4)."""
    return (2 * padding + 1) ** 2 * 2


def view_ids(index: torch.Tensor, params: CropFlipParams) -> torch.Tensor:
    """int64 ids ``index * V + (top * (2p+1) + left) * 2 + flip`` (V = :func:`num_views`), on ``index``'s
    device: one id per (dataset image, crop, flip), dense in [0, N * V)."""
    k = 2 * params.padding + 1
    dev = index.device
    code = (params.top.to(dev) * k + params.left.to(dev)) * 2 + params.flip.to(dev, torch.int64)
    return index.to(torch.int64) * num_views(params.padding) + code


def decode_views(views: torch.Tensor, padding: int = 4) -> tuple[torch.Tensor, CropFlipParams]:
    """(dataset index, crop/flip params) of each id of :func:`view_ids` (its inverse)."""
    k = 2 * padding + 1
    index, code = views.div(num_views(padding), rounding_mode="floor"), views.remainder(num_views(padding))
    offset = code.div(2, rounding_mode="floor")
    return index, CropFlipParams(
        top=offset.div(k, rounding_mode="floor"),
        left=offset.remainder(k),
        flip=code.remainder(2).bool(),
        padding=padding,
    )
