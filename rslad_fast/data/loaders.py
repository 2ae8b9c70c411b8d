"""In-memory CIFAR loaders: the whole uint8 set lives on the training device, batches are sliced from it.

Why not ``torch.utils.data.DataLoader``: CIFAR-10 is 150 MB as uint8, so it fits on any GPU; decoding /
PIL transforms / worker processes / host-to-device copies per batch are pure overhead (and the bottleneck
on 2 CPU cores). :class:`TensorLoader` keeps images and labels on ``device`` and does shuffling, sharding
and augmentation with tensor ops there.

Semantics follow ``DataLoader(shuffle=train) + DistributedSampler`` so results are comparable with the
official RSLAD code (``transforms.RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor()``, no
normalization) while being deterministic and resumable:

* shuffle order is a function of ``(seed, epoch)`` only, identical on every rank;
* each rank takes a disjoint strided slice ``perm[rank::world_size]`` of the permutation, padded by
  wrapping so all ranks get ``ceil(N / world_size)`` samples (the same number of steps: no DDP hang);
* augmentation draws come from a generator seeded by ``(seed, epoch, rank)`` on ``device``, so
  ``set_epoch(e)`` + iterate gives the same batches whether or not the run was resumed at epoch ``e``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .augment import apply_crop_flip, num_views, sample_crop_flip_params, view_ids

# mix_seed's last part for each random stream a run draws from its one --seed, so that no two streams are
# the same numbers (the values are arbitrary; changing one changes every run's results).
SALT_SHUFFLE = 0x5EED  # the epoch's shuffle (epoch_indices)
SALT_AUGMENT = 0xA06  # the torch loader's crops and flips
SALT_ATTACK = 0x7EA1  # the training attacks' random starts (engine.runner)
SALT_EVAL = 0xE7A1  # the per-epoch held-out PGD-20's random starts (engine.runner)
SALT_AVERAGE = 0x5A4  # PeerAiD's SWA student: its BatchNorm pass's shuffle and crops, its evaluation's starts


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (so (seed=0, epoch=1) and (seed=1, epoch=0) differ)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(ss.generate_state(1, np.uint64)[0] >> 1)


def epoch_indices(n: int, *, epoch: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's sample indices (CPU int64) for one epoch, DistributedSampler-style.

    Permutation from a CPU generator seeded by ``(seed, epoch)`` (identity when not shuffling), padded by
    wrapping around to a multiple of ``world_size``, then the strided slice ``[rank::world_size]``.
    Shared by :class:`TensorLoader` and the DALI loader so both see the same order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, SALT_SHUFFLE))
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    per_rank = math.ceil(n / world_size)
    total = per_rank * world_size
    if total > n:
        perm = perm.repeat(math.ceil(total / n))[:total]  # wrap around (repeat when world_size > n)
    return perm[rank:total:world_size]


class EpochBatches:
    """What the loaders share: the epoch the next iteration draws for, and this rank's batches per epoch
    (``num_samples`` per rank, ``batch_size``, ``drop_last``, set by the subclass)."""

    @staticmethod
    def check_source(images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        if labels.shape != (images_uint8.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images_uint8.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order and augmentation draws the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class TensorLoader(EpochBatches):
    """Yields ``(x float32 [B,3,H,W] in [0,1], y int64 [B])`` on ``device``; ``len()`` = batches per epoch.

    ``train=True`` shuffles and (if ``augment``) applies random crop (padding 4) + horizontal flip;
    ``train=False`` keeps the file order and never augments. Note that, as with DistributedSampler,
    ``world_size > 1`` pads by wrapping, so a sharded eval counts a few samples twice.
    ``drop_last`` drops this rank's final incomplete batch. Call :meth:`set_epoch` before each epoch.

    ``with_views=True`` yields ``(x, y, views)`` instead, ``views`` int64 [B] on ``device``: each image's
    view id (``augment.view_ids``: dataset index and the crop/flip drawn; the index alone when nothing is
    drawn), ``num_views`` per image. The images and every random draw are the same either way.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        padding: int = 4,
        with_views: bool = False,
    ):
        self.check_source(images_uint8, labels, batch_size)
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train, self.augment, self.padding = train, augment, padding
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.num_samples = math.ceil(len(self.images) / world_size)  # per rank, after padding
        self.with_views = with_views
        self.num_views = num_views(padding) if train and augment else 1

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch (on ``device``)."""
        return epoch_indices(
            len(self.images),
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.train,
            rank=self.rank,
            world_size=self.world_size,
        ).to(self.device)

    def __iter__(self):
        idx = self.indices()
        gen = None
        if self.train and self.augment:
            seed = mix_seed(self.seed, self.epoch, self.rank, SALT_AUGMENT)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[sel]
            views = sel
            if gen is not None:  # augment.random_crop_flip, its params kept for the view ids
                params = sample_crop_flip_params(x.shape[0], gen, self.padding, x.device)
                x = apply_crop_flip(x, params)
                views = view_ids(sel, params) if self.with_views else None
            if self.with_views:
                yield x.float().div_(255.0), self.labels[sel], views
            else:
                yield x.float().div_(255.0), self.labels[sel]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True
