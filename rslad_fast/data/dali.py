"""NVIDIA DALI loader: same order, sharding and augmentation distribution as :class:`TensorLoader`.

Why DALI at all: on a GPU the crop/flip/convert kernels run in DALI's own prefetching pipeline, overlapped
with the training step. The samples and their order come from :func:`~.loaders.epoch_indices` (seeded by
``(seed, epoch)``, DistributedSampler-style shards), fed by ``fn.external_source`` from the in-memory
uint8 set, so switching ``--loader torch`` <-> ``dali`` changes nothing but who draws the random crops.

Augmentation, as the official RSLAD code (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
``ToTensor()``, no normalization):

1. ``fn.crop`` with a window of ``(H+2p, W+2p)`` at the default centre position and
   ``out_of_bounds_policy="pad"``: anchor ``0.5 * (H - (H+2p)) = -p``, i.e. symmetric zero padding
   (``fn.pad`` would pad at the end only).
2. ``fn.crop_mirror_normalize`` with a ``(H, W)`` window, ``mirror=coin_flip(0.5)``, ``std=255``, CHW float.
   DALI places the window at ``round(crop_pos * (in - crop))`` = ``round(crop_pos * 2p)``. A continuous
   ``crop_pos ~ U(0, 1)`` would give the end offsets 0 and 2p half the probability of the others, unlike
   torchvision's ``randint(0, 2p+1)``; so ``crop_pos`` is drawn from the discrete values ``k / 2p``,
   k = 0..2p, which land exactly on offset k, each with probability 1 / (2p+1).

The random draws are DALI's (pipeline seed from ``(seed, start epoch, rank)``): deterministic for a given
run and resume point, but not the same numbers as the torch loader. DALI is imported only here, so
``import rslad_fast`` never needs it.

View ids (``with_views``, for the teacher-logit cache): the sample indices travel through
``external_source`` with the images, and the pipeline turns them and its own draws into
``augment.view_ids``' numbering (offset k = floor(crop_pos * 2p + 1/2), exact since crop_pos = k / 2p;
flip = the mirror draw), a third output, so the ids are those of the very pixels of the batch.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from .augment import num_views
from .loaders import EpochBatches, epoch_indices, mix_seed


def _build_pipeline(
    source,
    *,
    batch_size: int,
    device: str,
    device_id,
    seed: int,
    augment: bool,
    padding: int,
    hw: tuple[int, int],
    num_threads: int,
    prefetch: int,
    with_views: bool = False,
):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=prefetch
    )
    def pipe():
        if with_views:
            images, labels, index = fn.external_source(
                source=source,
                num_outputs=3,
                batch=True,
                layout=["HWC", "", ""],
                dtype=[types.UINT8, types.INT64, types.INT64],
            )
        else:
            images, labels = fn.external_source(
                source=source, num_outputs=2, batch=True, layout=["HWC", ""], dtype=[types.UINT8, types.INT64]
            )
        if device == "gpu":
            # Labels go up with the images, inside the pipeline: a host label batch would be a pageable,
            # blocking host-to-device copy, a synchronisation per training batch.
            images, labels = images.gpu(), labels.gpu()
        h, w = hw
        kw = {}
        if augment:
            pos = [k / (2 * padding) for k in range(2 * padding + 1)] if padding > 0 else [0.0]
            images = fn.crop(images, crop=(h + 2 * padding, w + 2 * padding), out_of_bounds_policy="pad", fill_values=0)
            kw = dict(
                crop=(h, w),
                crop_pos_x=fn.random.uniform(values=pos),
                crop_pos_y=fn.random.uniform(values=pos),
                mirror=fn.random.coin_flip(probability=0.5),
            )
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=0.0, std=255.0, **kw)
        if not with_views:
            return images, labels
        views = index
        if augment:

            def offset(pos):
                return fn.cast(dmath.floor(pos * (2 * padding) + 0.5), dtype=types.INT64)

            code = (offset(kw["crop_pos_y"]) * (2 * padding + 1) + offset(kw["crop_pos_x"])) * 2 + fn.cast(
                kw["mirror"], dtype=types.INT64
            )
            views = index * num_views(padding) + code
        return images, labels, views.gpu() if device == "gpu" else views

    p = pipe()
    p.build()
    return p


class DaliLoader(EpochBatches):
    """Same interface as :class:`~.loaders.TensorLoader`: ``set_epoch``, ``len()``, yields ``(x, y)`` on ``device``.

    ``device="cpu"`` runs a CPU-only DALI pipeline (used by the tests); a CUDA device runs the crops on
    that GPU, and images and labels both come out of the pipeline on it, copied on the current stream. The
    source set is kept on the host as NHWC numpy (external_source feeds host batches; the GPU pipeline copies
    each batch up, 1.5 MB for 512 images). The pipeline streams batches epoch after
    epoch so its prefetching crosses epoch boundaries; ``set_epoch`` to anything but the next epoch, or
    leaving an epoch early, rebuilds it. ``with_views=True`` yields ``(x, y, views)`` as TensorLoader does
    (see the module doc).
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
        num_threads: int = 2,
        prefetch: int = 2,
        with_views: bool = False,
    ):
        self.check_source(images_uint8, labels, batch_size)
        self.device = torch.device(device)
        self._nhwc = images_uint8.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        self._labels = labels.detach().cpu().to(torch.int64).numpy()
        self.batch_size, self.train, self.augment, self.padding = batch_size, train, augment, padding
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.num_threads, self.prefetch = num_threads, prefetch
        self.with_views = with_views
        self.num_views = num_views(padding) if train and augment else 1
        self.epoch = 0
        self.num_samples = math.ceil(len(self._labels) / world_size)
        self._pipe = None
        self._next_epoch = None  # epoch the running pipeline's stream is positioned at

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample order (CPU) for ``epoch`` (default: the current one); same as TensorLoader's."""
        return epoch_indices(
            len(self._labels),
            epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            shuffle=self.train,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _stream(self, start_epoch: int):
        """Host batches for epochs start_epoch, start_epoch+1, ... (what external_source pulls, ahead of use)."""
        for e in itertools.count(start_epoch):
            idx = self.indices(e).numpy()
            for b in range(len(self)):
                sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
                yield (self._nhwc[sel], self._labels[sel]) + ((sel,) if self.with_views else ())

    def _start(self) -> None:
        stream = self._stream(self.epoch)
        gpu = self.device.type == "cuda"
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._pipe = _build_pipeline(
            lambda: next(stream),
            batch_size=self.batch_size,
            device="gpu" if gpu else "cpu",
            device_id=device_id,
            seed=mix_seed(self.seed, self.epoch, self.rank) % (2**31),
            augment=self.train and self.augment,
            padding=self.padding,
            hw=self._nhwc.shape[1:3],
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            with_views=self.with_views,
        )
        self._next_epoch = self.epoch

    def _to_torch(self, tl, dtype: torch.dtype) -> torch.Tensor:
        """Copy a dense DALI TensorList into a new torch tensor on ``self.device`` (DALI reuses its buffers)."""
        from nvidia.dali.tensors import TensorListGPU

        if isinstance(tl, TensorListGPU):
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=dtype, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(tl.as_tensor())).to(self.device, dtype)  # the CPU pipeline

    def __iter__(self):
        if self._pipe is None or self._next_epoch != self.epoch:
            self._start()
        pipe, epoch = self._pipe, self.epoch
        self._next_epoch = None  # in progress: a second iterator started before this one ends must rebuild
        for _ in range(len(self)):
            images, labels, *views = pipe.run()
            out = self._to_torch(images, torch.float32), self._to_torch(labels, torch.int64)
            yield out + tuple(self._to_torch(v, torch.int64) for v in views)
        if self._pipe is pipe:  # finished the epoch: the stream now stands at the next one
            self._next_epoch = epoch + 1
