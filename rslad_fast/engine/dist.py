"""Who this process is in a torchrun launch, the process group's life, and the rule that follows: rank 0 writes.

``torchrun --nproc_per_node=N -m rslad_fast.train ...`` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (multi-node: torchrun's rendezvous sets the same). A process
with those variables is *launched*: :meth:`Dist.init` joins the process group and the engine trains the
student under DistributedDataParallel, even at WORLD_SIZE=1 (so ``--nproc_per_node=1`` exercises the NCCL
path on one GPU). Without them (``python -m rslad_fast.train``) nothing distributed happens at all: no
process group, no DDP wrapper, the single-process code path bit for bit.

Backends: gloo for CPU tensors, NCCL for CUDA tensors (one default group "cpu:gloo,cuda:nccl" when CUDA is
available, so the small CPU-side agreements below never touch the GPU; plain "gloo" otherwise). Each process
trains on ``cuda:LOCAL_RANK``.

Nothing is stored in module globals: a :class:`Dist` is passed to whatever needs it; the default
``Dist()`` is the single process, on which every collective helper here is a no-op.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from rslad_fast.errors import UserError

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def exit_process(code: int):
    """End the process with exit status ``code``: ``sys.exit(code)``, except in a torchrun-launched process,
    which flushes stdout/stderr and leaves with ``os._exit(code)``, skipping the interpreter's finalization.

    Why: a gloo worker thread (``pt_gloo_runloop``) may still be releasing the work of the last collective
    when the main thread finalizes. Dropping that work's tensor needs the GIL, a finalizing interpreter ends
    any thread that asks for it, and a thread ended inside a noexcept destructor aborts the process: a run
    that had finished and written everything died with SIGABRT ("terminate called without an active
    exception"), about one 2-process run in 15 here (the same race as pytorch/pytorch#179291). Everything
    the engine writes is closed (and renamed into place) before this point; the process group has been
    destroyed by then."""
    if "WORLD_SIZE" not in os.environ:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it anyway
            pass
    os._exit(code)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun: a process group and DDP (also at world_size 1)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, prints summaries and shows the progress bar."""
        return self.rank == 0

    # ---- environment and process group ------------------------------------------------------------------

    @classmethod
    def from_env(cls, env=None) -> "Dist":
        """Read torchrun's variables (none set: a single process). Joins nothing; see :meth:`init`."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        missing = [v for v in TORCHRUN_VARS if v not in env]
        if missing:
            raise UserError(
                f"WORLD_SIZE is set but not {', '.join(missing)}: start multi-process training with "
                f"torchrun (torchrun --nproc_per_node=N -m rslad_fast.train ...)"
            )
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env["LOCAL_RANK"])
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE must be integers") from None
        if not (world >= 1 and 0 <= rank < world and 0 <= local < local_world):
            raise UserError(
                f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                f"LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world}"
            )
        return cls(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, launched=True)

    def init(self) -> None:
        """Join the default process group (launched processes only; blocks until every rank has joined)."""

        if not self.launched or tdist.is_initialized():
            return
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo"
        tdist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)

    def close(self) -> None:
        """Leave the process group (launched processes only)."""

        if self.launched and tdist.is_initialized():
            tdist.destroy_process_group()

    def device(self, name: str) -> torch.device:
        """The device this process trains on, from the config's ``--device``.

        Single process: the device as given. Launched: ``cuda`` means ``cuda:LOCAL_RANK`` (one GPU per
        process); an explicit ``cuda:N`` is accepted only with one process per node."""
        dev = torch.device(name)
        if not self.launched or dev.type != "cuda":
            return dev
        count = torch.cuda.device_count()
        if dev.index is not None:
            if self.local_world_size > 1:
                raise UserError(
                    f"--device {name}: with {self.local_world_size} processes per node each one "
                    f"uses cuda:LOCAL_RANK; pass --device cuda"
                )
            return dev
        if self.local_rank >= count:
            raise UserError(
                f"--device cuda: {self.local_world_size} processes per node but only {count} CUDA "
                f"device(s) visible; pass --nproc_per_node={count} or fewer"
            )
        return torch.device("cuda", self.local_rank)

    # ---- collectives (no-ops in a single process) --------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.launched and self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank gets here (a CPU all-reduce over gloo: no device, no NCCL warning)."""
        if self.active:
            tdist.all_reduce(torch.zeros(1))

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (gloo on the CPU, NCCL on CUDA); returns ``t``."""
        if self.active:
            tdist.all_reduce(t)
        return t

    def all_gather_object(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects, over gloo)."""
        if not self.active:
            return [obj]

        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def first_error(self, message: Optional[str]) -> Optional[str]:
        """Agree on failure: every rank passes its error (or None) and gets the same answer back, the first
        error by rank, so that all ranks exit together after a failed check instead of some of them waiting
        forever in the next collective."""
        if not self.active:
            return message
        for rank, msg in enumerate(self.all_gather_object(message)):
            if msg is not None:
                return msg if rank == 0 else f"rank {rank}: {msg}"
        return None

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        BatchNorm is per rank (DDP with broadcast_buffers=False): each rank's running averages follow its
        own batches during the epoch. Before the evaluation and the checkpoint they are made rank 0's on
        every rank, so that every rank evaluates the very model rank 0 saves."""
        if self.active:
            for b in module.buffers():
                tdist.broadcast(b, src=0)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The DDP-wrapped student for the training forwards (launched), else ``module`` itself.

        ``broadcast_buffers=False``: BatchNorm stays per rank (see :meth:`broadcast_buffers`); no
        ``find_unused_parameters``: every method uses every parameter in every step."""
        if not self.launched:
            return module

        ids = [device.index] if device.type == "cuda" else None
        # torch >= 2.14 names it forward_sync_buffers (broadcast_buffers warns); both keep the buffers per rank
        # between the forwards, which is all we need (the initial sync is harmless: same seeded init)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None, **no_sync)

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n items, sizes differing by at most one, no padding
        (evaluation: every image counted exactly once)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size


def agreed(dist: "Dist", check: Callable[[], T]) -> T:
    """``check()`` on every rank; where it raises UserError on any rank, every rank raises the first rank's
    error (one collective), so that all of them stop together and none waits in a later collective."""
    error: Optional[str] = None
    result = None
    try:
        result = check()
    except UserError as e:
        error = str(e)
    error = dist.first_error(error)
    if error is not None:
        raise Agreed(error)
    return result


class Agreed(UserError):
    """A UserError that :func:`agreed` raised on every rank at once: rank 0 alone says it."""
