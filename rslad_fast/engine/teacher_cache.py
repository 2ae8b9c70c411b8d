"""Teacher-logit cache: each augmented view of each training image goes through the frozen teacher once.

Why: the teacher is frozen and in eval mode, so T(x) is a function of the image and its view alone (crop
offset and flip: ``augment.num_views`` = 162 views per image for padding 4). Over RSLAD's 300 epochs an image
meets about 137 distinct views, so computing each view's logits the first time it is drawn and gathering
them afterwards skips about 54% of the teacher's forwards, with the same targets.

What is cached: ``step.teacher_logits`` of the natural augmented batch (``ctx.teacher_logits``), nothing
else; a method's own teacher calls (IAD's T(x') through ``ctx.teacher``) never come here. The table is dense
fp32 ``[N * V, C]`` plus a filled mask, on the training device: 50,000 x 162 x 10 x 4 bytes = 324 MB, with the
mask 332 MB, for CIFAR-10; C is the data set's class count, so CIFAR-100's table is 3.24 GB (3.25 GB with
the mask). It is derived state: never in a checkpoint (a resumed run refills it lazily), never shared between
runs (a changed teacher cannot reuse it), one per process under torchrun (each rank's shard changes every
epoch, so each keeps the whole set's table).

Exactness: a hit returns the logits the teacher gave for that view in an earlier batch. The teacher's
per-image result does not depend on the rest of its batch mathematically, but kernels may reduce in another
order for another batch size, so served logits equal a fresh forward up to float rounding (fp32: ~1e-6
relative), not necessarily bitwise. Under autocast the stored values are the autocast logits, as uncached.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from rslad_fast.errors import UserError

from .step import teacher_logits

# The cache may take at most this fraction of the memory free when it is sized, so that training (models,
# activations, the attack) keeps the rest.
MAX_FREE_FRACTION = 0.5
MODES = ("auto", "on", "off")


def table_bytes(num_images: int, num_views: int, num_classes: int) -> int:
    """The cache's memory: the fp32 table and its one-byte filled mask."""
    return num_images * num_views * (num_classes * 4 + 1)


def free_bytes(device) -> Optional[int]:
    """Memory free for new allocations on ``device`` (CUDA: the driver's free; CPU: MemAvailable), or None
    where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fmt_bytes(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def check_fits(num_images: int, num_views: int, num_classes: int, device, processes: int = 1) -> Optional[str]:
    """None when the table fits on ``device`` (at most MAX_FREE_FRACTION of its free memory, shared by
    ``processes`` caches on the same host memory), else why not, in words."""
    need = table_bytes(num_images, num_views, num_classes)
    free = free_bytes(device)
    if free is None:
        return None
    budget = int(free * MAX_FREE_FRACTION) // max(processes, 1)
    if need <= budget:
        return None
    return (
        f"the teacher-logit cache needs {fmt_bytes(need)} ({num_images} images x {num_views} views x "
        f"{num_classes} classes, fp32) but {torch.device(device).type} memory has {fmt_bytes(free)} free "
        f"(the cache may take {int(MAX_FREE_FRACTION * 100)}% of it"
        + (f", shared by {processes} processes" if processes > 1 else "")
        + ")"
    )


class TeacherCache:
    """The teacher's fp32 logits per view id (``augment.view_ids``), filled on first use.

    ``logits(teacher, x, views, amp_dtype)`` gathers the hits, runs the teacher (``step.teacher_logits``:
    inference mode, the same autocast) on the misses only and stores them. ``hits`` and ``lookups`` count
    images since construction (Python ints: the miss count is read on the host anyway, to size the
    teacher's batch)."""

    def __init__(self, num_images: int, num_views: int, num_classes: int, device):
        self.num_images, self.num_views, self.num_classes = num_images, num_views, num_classes
        self.device = torch.device(device)
        n = num_images * num_views
        try:
            self.table = torch.empty(n, num_classes, dtype=torch.float32, device=self.device)
            self.filled = torch.zeros(n, dtype=torch.bool, device=self.device)
        except (torch.OutOfMemoryError, RuntimeError):  # RuntimeError: the CPU allocator's failure
            raise UserError(
                f"the teacher-logit cache ({fmt_bytes(self.nbytes)}) does not fit in "
                f"{self.device} memory; train with --teacher-cache off"
            ) from None
        self.hits = self.lookups = 0

    @property
    def nbytes(self) -> int:
        return table_bytes(self.num_images, self.num_views, self.num_classes)

    def describe(self) -> str:
        return (
            f"{self.num_images} images x {self.num_views} views x {self.num_classes} classes, "
            f"{fmt_bytes(self.nbytes)} on {self.device}"
        )

    def logits(
        self, teacher: torch.nn.Module, x: torch.Tensor, views: torch.Tensor, amp_dtype: Optional[torch.dtype] = None
    ) -> torch.Tensor:
        """T(x) as ``step.teacher_logits`` returns it ([B, C] fp32), the teacher run on the misses only."""
        if views.shape != (x.shape[0],):
            raise ValueError(f"views must be [B] = [{x.shape[0]}], got {tuple(views.shape)}")
        views = views.to(self.device, torch.int64)
        miss = (~self.filled[views]).nonzero().squeeze(1)
        n_miss = miss.numel()  # syncs: the teacher's batch size
        self.lookups += views.numel()
        self.hits += views.numel() - n_miss
        if n_miss == views.numel():  # the first epoch's batches: no gather, the teacher's batch as uncached
            out = teacher_logits(teacher, x, amp_dtype)
            self._store(views, out)
            return out
        out = self.table[views]
        if n_miss:
            xm = x.index_select(0, miss.to(x.device))
            if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                xm = xm.contiguous(memory_format=torch.channels_last)  # the teacher's layout, as for x
            fresh = teacher_logits(teacher, xm, amp_dtype)
            out[miss] = fresh.to(out.device)
            self._store(views[miss], fresh)
        return out.to(x.device)

    def _store(self, views: torch.Tensor, logits: torch.Tensor) -> None:
        self.table[views] = logits.to(self.device)
        self.filled[views] = True

    def stats(self) -> tuple[int, int]:
        """(hits, lookups) so far."""
        return self.hits, self.lookups
