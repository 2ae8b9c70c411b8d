"""Who this process is in a (future) multi-process run, and the one rule that follows: rank 0 writes.

Nothing in the engine assumes a single process: every file write goes through ``Dist.is_main``, the loaders
take ``rank``/``world_size``, and nothing is stored in module globals. Launching with torchrun (DDP) is not
implemented yet, so :meth:`Dist.from_env` refuses ``WORLD_SIZE > 1`` with a clear message instead of
silently training ``WORLD_SIZE`` independent copies that race on the same run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from rslad_fast.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, prints summaries and shows the progress bar."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: a single process)."""
        try:
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
        if world != 1:
            raise UserError(f"WORLD_SIZE={world}: multi-process (torchrun/DDP) training is not implemented yet; "
                            f"run a single process")
        return cls(rank=rank, world_size=world, local_rank=local)
