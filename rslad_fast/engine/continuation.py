"""Where a run continues from: its ``last.pt`` restored into the freshly built training objects (bit for bit,
see ``checkpoint.py``), the metrics lines after it dropped, and the attack streams re-derived when the process
count changed. Called by ``runner.run`` before the first epoch."""

from __future__ import annotations

from typing import Callable

from rslad_fast.data.loaders import SALT_ATTACK, mix_seed
from rslad_fast.errors import UserError

from .checkpoint import load_checkpoint, restore, saved_world_size
from .config import same_run
from .dist import Dist


def continue_from_last(r, *, dist: Dist, say: Callable[[str], None], tag: str) -> tuple:
    """Continue from ``last.pt`` when the run directory holds one: model, optimizer, schedule and RNG states
    restored, the metrics lines after it dropped. Returns (completed epochs, best PGD-20 accuracy so far,
    the metrics records kept: rank 0's, [] on the other ranks). ``r``: the runner's ``_Training``; ``say``:
    rank 0's log line."""
    cfg, run_dir = r.cfg, r.run_dir
    start, best_acc = 0, -1.0
    if dist.is_main:
        for stale in run_dir.path.glob(".*.tmp-*"):  # left by a process killed mid-write (see checkpoint.py)
            stale.unlink()
    saved_world = dist.world_size
    if run_dir.last.exists():
        ckpt = load_checkpoint(run_dir.last)
        if not same_run(ckpt["config"], cfg.to_dict()):
            raise UserError(
                f"{run_dir.last} was written by a different configuration than {run_dir.config}; refusing to resume"
            )
        restore(
            ckpt,
            model=r.module,
            optimizer=r.parts.optimizer,
            scheduler=r.parts.scheduler,
            train_generator=r.parts.generator,
            method=r.parts.method,
            rank=dist.rank,
            path=run_dir.last,
            epochs=cfg.epochs,
        )
        start, best_acc = int(ckpt["epoch"]), float(ckpt["best_acc"])
        saved_world = saved_world_size(ckpt["rng"])
        del ckpt
    records = r.log.truncate_after(start) if dist.is_main else []
    if 0 < start < cfg.epochs:
        say(f"[{tag}] resuming {run_dir.path} after epoch {start}/{cfg.epochs}")
    if start < cfg.epochs and saved_world != dist.world_size:
        # The shards, per-rank batches and gradient averaging change with the world size, so this cannot be
        # bitwise any uninterrupted run; the attack streams are re-derived per (seed, rank, epoch) rather
        # than handing one saved rank's stream to several ranks.
        r.parts.generator.manual_seed(mix_seed(cfg.seed, dist.rank, SALT_ATTACK, start))
        say(
            f"[{tag}] last.pt was written by {saved_world} process(es), resuming with {dist.world_size}: model, "
            f"optimizer, lr schedule and epoch continue; not bitwise an uninterrupted run"
        )
    return start, best_acc, list(records)
