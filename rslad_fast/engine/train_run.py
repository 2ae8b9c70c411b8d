"""One training run end to end, the engine's typed entry point: :func:`train` (a new run: a :class:`Config`
in, a run directory out) and :func:`resume` (a run directory's own config.json in).

1. Every check that can fail on user input, on every rank, with nothing written (``preparation.py``); the ranks
   agree on the outcome, so all stop together.
2. Rank 0 locks the run directory for the whole run (a new run: creates or empties it under the lock and
   writes config.json).
3. The self-trained teacher's stage (a distillation run without a teacher file): its own run directory,
   ``RUN_DIR/teacher``, trained (or finished, or just reused) first, then loaded by every rank.
4. The student's run (``runner.run``).

Failures reach the caller as exceptions, each with the message to print: ``UserError`` (bad input),
``checkpoint.WriteError`` and ``OSError`` (the file system), ``Diverged``, ``KeyboardInterrupt``; what to
advise (``train --resume`` or "rerun the sweep") is the caller's.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from rslad_fast.errors import UserError
from rslad_fast.models import build as build_model
from rslad_fast.models.loading import load_checkpoint_into

from . import estimate, runner
from .config import Config, same_run
from .dist import Dist, agreed
from .preparation import Prepared, prepare
from .presets import CPU_CHOICES
from .rundir import RunDir, RunLock, check_out_dir, create_run_dir, write_config
from .runner import _log, run
from .teacher import cast_teacher, freeze


def train(
    cfg: Config,
    run_dir,
    *,
    dist: Optional[Dist] = None,
    overwrite: bool = False,
    download="auto",
    eval_n_given: bool = True,
    progress: bool = True,
    say: Optional[Callable[[str], None]] = None,
) -> dict:
    """Train the new run ``cfg`` in ``run_dir`` (refused when it is not empty, unless ``overwrite``).

    ``eval_n_given``: whether ``cfg.eval_n`` was asked for (an error when it exceeds the test set) or is the
    preset's (it then shrinks to the test set, said in a note). ``say``: where rank 0's notes and start
    line go (default: print). Returns the last epoch's metrics record plus ``best_acc``."""
    dist = dist or Dist()

    def check():
        check_out_dir(run_dir, overwrite)
        dist.device(cfg.device)  # torchrun: one GPU per local rank
        return prepare(cfg, download=download, eval_n_given=eval_n_given)

    prep = agreed(dist, check)
    lock = agreed(dist, lambda: create_run_dir(run_dir, cfg, overwrite=overwrite, dist=dist))
    return _locked(prep, RunDir(run_dir), lock, dist=dist, new=True, progress=progress, say=say)


def resume(
    run_dir,
    *,
    dist: Optional[Dist] = None,
    download="auto",
    progress: bool = True,
    say: Optional[Callable[[str], None]] = None,
) -> dict:
    """Continue the run in ``run_dir`` from its last.pt, with its config.json's settings (see :func:`train`)."""
    dist = dist or Dist()

    def check():
        cfg = RunDir(run_dir).read_config()
        dist.device(cfg.device)
        return prepare(cfg, download=download, eval_n_given=True)  # a resumed run's eval_n counts as given

    prep = agreed(dist, check)
    lock = agreed(dist, lambda: RunLock(run_dir) if dist.is_main else None)
    return _locked(prep, RunDir(run_dir), lock, dist=dist, new=False, progress=progress, say=say)


def _locked(prep: Prepared, run_dir: RunDir, lock, *, dist: Dist, new: bool, progress: bool, say) -> dict:
    try:
        if dist.is_main:
            _start_lines(prep, run_dir, dist, new, say or (lambda line: print(line, flush=True)))
        if prep.teacher_prep is not None:
            prep.teacher_model = train_teacher(prep, run_dir, dist=dist, progress=progress)
        return run(prep, run_dir.path, dist=dist, progress=progress)
    finally:
        if lock is not None:
            lock.close()


def run_prepared(prep: Prepared, run_dir, *, dist: Optional[Dist] = None, progress: bool = True, **kw) -> dict:
    """The stages of a prepared run whose directory exists (``create_run_dir``): the self-trained teacher's,
    then the student's ``runner.run`` (``kw``: its ``stop_after`` or ``tag``). What :func:`train` does after its
    checks and lock, for code that prepares a run itself (tests, the benchmarks)."""
    dist = dist or Dist()
    if prep.teacher_prep is not None and prep.teacher_model is None:
        prep.teacher_model = train_teacher(prep, RunDir(run_dir), dist=dist, progress=progress)
    return run(prep, run_dir, dist=dist, progress=progress, **kw)


def train_teacher(prep: Prepared, run_dir: RunDir, *, dist: Dist, progress: bool) -> torch.nn.Module:
    """The self-trained teacher's stage: train (or finish training, or just reuse) it in
    ``RUN_DIR/teacher``, then load it, frozen, in the run's teacher dtype.

    Under torchrun the teacher trains under DDP like any run; rank 0 writes its directory, every rank then
    loads ``teacher/last.pt`` once ``run`` has returned (its closing barrier: the file is complete)."""
    cfg, tprep = prep.cfg, prep.teacher_prep
    tcfg, tdir = tprep.cfg, run_dir.teacher(cfg.teacher["dir"])
    batches = estimate.batches_per_epoch(len(prep.train[0]), cfg.batch_size, dist.world_size)
    then = (
        f"the student's run follows: {cfg.method} {cfg.student}, {estimate.count(cfg.epochs, 'epoch')} x "
        f"{estimate.count(batches, 'batch')}"
    )
    # every rank checks (reads only), so that a mismatch stops all of them, not only rank 0
    if tdir.has_config():
        if not same_run(tdir.read_config().to_dict(), tcfg.to_dict()):
            raise UserError(f"{tdir.config} does not match this run's teacher configuration")
    elif dist.is_main:
        tdir.path.mkdir(parents=True, exist_ok=True)
        write_config(tdir.path, tcfg)
    t0 = time.perf_counter()
    runner.run(tprep, tdir.path, dist=dist, progress=progress, tag=f"teacher {tcfg.method}/{tcfg.student}", then=then)
    _log(f"[teacher] ready ({time.perf_counter() - t0:.0f}s): {tdir.last}", dist)
    model = build_model(tcfg.student, tcfg.num_classes, normalization=tcfg.wrn70_16_norm)
    load_checkpoint_into(model, tdir.last, tcfg.student)
    return cast_teacher(freeze(model), cfg.teacher_dtype)


def _start_lines(prep: Prepared, run_dir: RunDir, dist: Dist, new: bool, say) -> None:
    """Rank 0's notes and start line: what the checks adjusted, the run's settings, its size."""
    cfg = prep.cfg
    for note in prep.notes:
        say(f"note: {note}")
    teacher = cfg.teacher and (cfg.teacher.get("path") or f"self-trained {cfg.teacher['arch']} (TRADES)")
    batch = f"batch {cfg.batch_size}"
    if dist.launched:
        batch += f" x {dist.world_size} processes = {cfg.batch_size * dist.world_size}" + (
            ", SyncBatchNorm" if cfg.sync_bn else ", BatchNorm per process"
        )
    cpu = cfg.versions.get("cpu") if isinstance(cfg.versions, dict) else None
    chooses = cfg.student in CPU_CHOICES or (cfg.teacher or {}).get("arch") in CPU_CHOICES
    if new and cfg.device == "cpu" and isinstance(cpu, dict) and cpu.get("native_bf16") and chooses:
        say(
            f"note: this CPU ({cpu.get('model')}) has native bf16 ({', '.join(cpu.get('flags', []))}): bf16 is "
            f"chosen where it pays for the architecture (engine/presets.py CPU_CHOICES): --amp {cfg.amp}"
            + (f", --teacher-dtype {cfg.teacher_dtype}" if cfg.teacher else "")
            + " (give either flag to choose)"
        )
    say(
        f"{'run' if new else 'resume'} {run_dir.path}: {cfg.method} {cfg.student}, preset "
        f"{cfg.preset}, {cfg.epochs} epochs, {batch}, lr {cfg.lr:g} "
        f"(x{cfg.gamma:g} at {cfg.milestones}), wd {cfg.weight_decay:g}, train images "
        f"{len(prep.train[0])}, eval {cfg.held_n} {'held-out training' if cfg.val_n is not None else 'test'}, "
        f"device {cfg.device}, {cfg.threads} threads, {cfg.amp}"
        f"{', channels_last' if cfg.channels_last else ''}{', BN folded in eval passes' if cfg.fold_bn else ''}"
        + (f", teacher {teacher} in {cfg.teacher_dtype}" if teacher else "")
        + (f", natural teacher {cfg.nat_teacher['path']} ({cfg.nat_teacher['arch']})" if cfg.nat_teacher else "")
        + (f", {cfg.dataset}" if cfg.dataset != "cifar10" else "")
    )
    if not new:
        return  # a resume's teacher may be trained already, and its size was said at its start
    if prep.teacher_prep is not None:
        note = estimate.self_trained_teacher_note(
            cfg, len(prep.train[0]), len(prep.teacher_prep.train[0]), dist.world_size
        )
        say(f"note: {note}")
    if cfg.preset != "quick":
        batches = estimate.batches_per_epoch(len(prep.train[0]), cfg.batch_size, dist.world_size) * cfg.epochs
        if prep.teacher_prep is not None:
            t = prep.teacher_prep.cfg
            batches += estimate.batches_per_epoch(len(prep.teacher_prep.train[0]), t.batch_size, dist.world_size) * (
                t.epochs
            )
        note = estimate.long_cpu_run_note(cfg.device, batches)
        if note:
            say(f"note: {note}")
