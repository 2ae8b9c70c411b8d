"""The training driver: train (or continue training) a run whose directory exists, epoch by epoch.

``run`` both starts and resumes: when the run directory holds a ``last.pt`` it continues from it, bit for
bit (``continuation.py``, ``checkpoint.py``). What comes before it (the checks, the run directory, the self-trained
teacher's stage) is ``train_run.py``; the objects it trains with are built by ``build.py``.

Per epoch, the writes happen in the order best.pt, swa_best.pt, metrics line, TensorBoard events
(--tensorboard), swa_last.pt, last.pt, curves.png (the swa_ files: PeerAiD's SWA student, see
``Method.after_epoch``): a run killed between any two of them resumes from the previous last.pt, drops the
metrics lines (and, in TensorBoard's view, the events: ``tb_log.py``) after it and redoes the epoch, which
produces the same weights again.

Under torchrun (see ``dist.py``) every rank runs all of this: each builds the same seeded student, restores
the same checkpoint, trains its shard through DDP and evaluates its slice of the held images; only rank 0
writes (metrics, curves, checkpoints). The other ranks wait at a barrier at the end of :func:`run` until rank
0's last files are complete, which is how a self-trained teacher is written once by rank 0 and then loaded
by every rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from rslad_fast.data import make_loader
from rslad_fast.data.loaders import SALT_ATTACK, SALT_AVERAGE, SALT_EVAL, mix_seed
from rslad_fast.methods.mtard import TwoTeachers

from . import estimate
from .build import Parts, build_parts, setup_device
from .checkpoint import WriteError, save_checkpoint
from .config import Config
from .continuation import continue_from_last
from .dist import Dist
from .loop import Diverged, EpochState, evaluate, first_non_finite, train_one_epoch
from .metrics import MetricsLog, plot_curves
from .precision import tf32
from .preparation import Prepared
from .rundir import RunDir
from .tb_log import TensorBoardLog
from .teacher_cache import TeacherCache


def _log(msg: str, dist: Dist) -> None:
    if dist.is_main:
        tqdm.write(msg, file=sys.stdout)


def run(
    prep: Prepared,
    run_dir,
    *,
    dist: Dist = Dist(),
    progress: bool = True,
    tag: str = "",
    stop_after: Optional[int] = None,
    then: Optional[str] = None,
) -> dict:
    """Train (or continue training) the run in ``run_dir``, whose config.json must already exist, under the
    run's TF32 policy (engine/precision.py, restored afterwards).

    Returns the last epoch's metrics record plus ``best_acc``. ``stop_after`` (tests) returns after that
    many completed epochs, as if the process had been killed right after the checkpoint. ``then``: what runs
    after this run (the student's run after its self-trained teacher), for the time estimate's log line.

    ``dist``: this process's place in a torchrun launch (default: the single process). Every rank calls
    ``run``; the student trains under DDP, the attacks on the plain module, the teacher is replicated in eval
    mode without a wrapper; rank 0 writes; every rank returns the same record.
    """
    tag = tag or f"{prep.cfg.method}/{prep.cfg.student}"
    with tf32(prep.cfg.allow_tf32):
        return _run(prep, RunDir(run_dir), dist=dist, progress=progress, tag=tag, stop_after=stop_after, then=then)


def _run(
    prep: Prepared,
    run_dir: RunDir,
    *,
    dist: Dist,
    progress: bool,
    tag: str,
    stop_after: Optional[int],
    then: Optional[str] = None,
) -> dict:
    """:func:`run`'s steps: build, resume, then train and close each epoch; the time estimate once the
    first batches of this process are timed (rank 0)."""

    cfg = prep.cfg
    r = _build(prep, run_dir, dist=dist)
    start, best_acc, records = continue_from_last(r, dist=dist, say=lambda m: _log(m, dist), tag=tag)
    if r.teacher_cache is not None and start < cfg.epochs:
        _log(
            f"[{tag}] teacher-logit cache: {r.teacher_cache.describe()}, filled as the views are drawn "
            f"(each view's teacher forward runs once)",
            dist,
        )
    if start >= cfg.epochs:
        _log(f"[{tag}] already complete ({start}/{cfg.epochs} epochs) in {run_dir.path}", dist)
        dist.barrier()
        return {**(records[-1] if records else {}), "best_acc": best_acc}
    student = dist.wrap(r.module, r.device)  # after the restore: every rank starts from the same weights
    if cfg.tensorboard and dist.is_main:
        r.tb = TensorBoardLog(run_dir.tensorboard, start=start, config=cfg.to_dict())

    steps = len(r.loader)
    bar = tqdm(
        total=cfg.epochs * steps,
        initial=start * steps,
        desc=tag,
        unit="batch",
        dynamic_ncols=True,
        smoothing=0,
        disable=not (progress and dist.is_main),
        file=sys.stderr,
    )
    timer = estimate.FirstBatches(
        r.device, steps, lambda s: _log_estimate(r, s, cfg.epochs - start, steps, dist=dist, tag=tag, then=then)
    )
    state = EpochState(
        student=student,
        method=r.parts.method,
        loader=r.loader,
        optimizer=r.parts.optimizer,
        teacher=r.parts.teacher,
        generator=r.parts.generator,
        amp_dtype=r.parts.amp_dtype,
        channels_last=cfg.channels_last,
        dist=dist,
        teacher_cache=r.teacher_cache,
        fold=r.parts.fold,
    )
    record = {}
    try:
        for epoch in range(start, cfg.epochs):
            lr = r.parts.optimizer.param_groups[0]["lr"]
            bar.set_description(f"{tag} ep {epoch + 1}/{cfg.epochs}")
            try:
                train_stats = train_one_epoch(
                    state, epoch, bar=bar, on_batch=timer if epoch == start and dist.is_main else None
                )
            except Diverged as e:
                raise Diverged(f"{e}; {_kept(r, epoch)}; a lower --lr may help") from None
            record, best_acc = _end_of_epoch(r, epoch, lr, train_stats, best_acc, records, dist=dist, tag=tag)
            records.append(record)
            if stop_after is not None and epoch + 1 >= stop_after:
                break
    finally:
        bar.close()
        if r.tb is not None:
            r.tb.close()
    dist.barrier()  # rank 0's files of this run are complete before any rank goes on (and reads them)
    return {**record, "best_acc": best_acc}


def _log_estimate(r: "_Training", step_s: float, epochs: int, batches: int, *, dist: Dist, tag: str, then) -> None:
    """The run's time estimate from its measured seconds per batch, plus one timed evaluation pass on the
    student itself (its weights, modes and the RNG streams untouched: the run stays bitwise the same)."""
    cfg = r.cfg
    images = math.ceil(len(r.held[0]) / dist.world_size)  # this rank's slice of the held-out set
    eval_s = estimate.measure_eval_seconds(cfg, images=images, model=r.parts.eval_model(), device=r.device)
    total = estimate.estimate_run(cfg, step_s, batches, epochs, eval_seconds=eval_s)
    _log(
        f"[{tag}] estimate: about {estimate.fmt_duration(total)} for the remaining {estimate.count(epochs, 'epoch')} "
        f"x {estimate.count(batches, 'batch')} ({step_s:.3g} s/batch on {estimate.device_text(r.device)}, + per-epoch "
        f"evaluation {estimate.fmt_duration(eval_s)})" + (f"; then {then}" if then else ""),
        dist,
    )
    if r.device.type == "cpu" and total > estimate.CPU_POINTER_SECONDS and cfg.preset != "quick":
        _log(f"[{tag}] on a CPU, --preset quick trains a CPU-sized run ({estimate.QUICK_PRESET_CPU})", dist)


@dataclass
class _Training:
    """What :func:`_run` trains with, as :func:`_build` makes it (``parts.student``: the plain student)."""

    cfg: Config
    run_dir: RunDir
    parts: Parts
    loader: object
    held: tuple  # the held-out images and labels, on the device
    log: MetricsLog
    teacher_cache: Optional[TeacherCache] = None  # derived state: never checkpointed, refilled after a resume
    tb: Optional[TensorBoardLog] = None  # --tensorboard, rank 0: opened once the completed epochs are known
    train_set: tuple = ()  # the training images and labels (CPU), for the loader below
    # PeerAiD's SWA student's BatchNorm pass: every training image on every rank (the single-process copy
    # everywhere), its own seed (the training batches' streams untouched); made at the first average
    average_loader: Optional[object] = None

    device = property(lambda self: self.parts.device)
    module = property(lambda self: self.parts.student)


def _build(prep: Prepared, run_dir: RunDir, *, dist: Dist) -> _Training:
    """The device set up and the seeded student with its optimizer, schedule, attack generator, method and
    loaders (``build.py``), beside the ready teacher (``prep.teacher_model``: a file's, or the self-trained
    one that ``train_run`` trained first): what a new run starts from and a resumed one restores into."""
    cfg = prep.cfg
    device = dist.device(cfg.device)
    setup_device(cfg, device)
    teacher = prep.teacher_model
    if cfg.teacher is not None and teacher is None:
        raise RuntimeError("a distillation run reached the runner without its teacher")
    if cfg.nat_teacher is not None:  # MTARD: the adversarial teacher (a file's or self-trained) and the natural one
        if prep.nat_teacher_model is None:
            raise RuntimeError("an MTARD run reached the runner without its natural teacher")
        teacher = TwoTeachers(teacher, prep.nat_teacher_model)
    parts = build_parts(cfg, device, teacher, generator_seed=mix_seed(cfg.seed, dist.rank, SALT_ATTACK))
    cached = prep.teacher_cache and teacher is not None
    if dist.active:  # every rank caches or none does: each rank measured its own free memory
        agreed = all(dist.all_gather_object(bool(cached)))
        if cached and not agreed:
            _log("teacher-logit cache: off, another process had not the memory for it", dist)
        cached = agreed
    loader = make_loader(
        cfg.loader,
        *prep.train,
        cfg.batch_size,
        train=True,
        device=device,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        with_views=cached,
    )
    # every rank caches the whole set: its shard changes every epoch
    cache = TeacherCache(len(prep.train[0]), loader.num_views, cfg.num_classes, device) if cached else None
    held = (prep.held[0].to(device), prep.held[1].to(device))
    return _Training(
        cfg=cfg,
        run_dir=run_dir,
        parts=parts,
        loader=loader,
        held=held,
        log=MetricsLog(run_dir.metrics),
        teacher_cache=cache,
        train_set=prep.train,
    )


def _average_batches(r: _Training, epoch: int):
    """The SWA student's BatchNorm pass over epoch ``epoch``'s reshuffled, re-augmented training images (the
    official ``bn_update`` iterates the training loader once more), in the run's memory format."""
    if r.average_loader is None:
        seed = mix_seed(r.cfg.seed, SALT_AVERAGE)
        r.average_loader = make_loader("torch", *r.train_set, r.cfg.batch_size, train=True, device=r.device, seed=seed)
    loader = r.average_loader
    loader.set_epoch(epoch)
    for x, _ in loader:
        yield x.contiguous(memory_format=torch.channels_last) if r.cfg.channels_last else x


def _kept(r: _Training, epoch: int) -> str:
    """What a failure in epoch ``epoch`` (from 0) leaves to resume from."""
    return f"{r.run_dir.last} of epoch {epoch} is kept" if epoch else "no checkpoint was written"


def _end_of_epoch(
    r: _Training,
    epoch: int,
    lr: float,
    train_stats: dict,
    best_acc: float,
    records: list,
    *,
    dist: Dist,
    tag: str,
) -> tuple:
    """After epoch ``epoch``'s training: the non-finite check, the method's ``after_epoch`` (PeerAiD's SWA
    student, then evaluated too), the held-out evaluation, the lr step, and (rank 0) best.pt, swa_best.pt, the
    metrics line, swa_last.pt, last.pt, the curves and the log line, in that order. Returns (the epoch's record,
    the best PGD-20 accuracy so far)."""
    cfg, run_dir, module = r.cfg, r.run_dir, r.module
    dist.broadcast_buffers(module)  # per-rank BN statistics -> rank 0's: the model that is saved
    # the loss can stay finite while a weight or a BatchNorm statistic does not (train mode normalizes
    # with the batch's statistics): nothing non-finite is ever evaluated or saved. The same on every
    # rank (DDP's weights, rank 0's buffers), so all ranks stop together.
    bad = first_non_finite(module)
    if bad is not None:
        raise Diverged(
            f"training diverged in epoch {epoch + 1}: {bad} is not finite after its "
            f"{train_stats['batches']} batches; {_kept(r, epoch)}; a lower --lr may help"
        )
    average = r.parts.method.after_epoch(epoch, module, lambda: _average_batches(r, epoch))
    if average is not None:  # rank 0's statistics everywhere, as the student's: the model every rank evaluates
        dist.broadcast_buffers(average)  # is the one rank 0 saves (the passes agree up to kernel choice)
    # rank 0 draws the single-process stream; the other ranks, their own (seed, epoch, rank) streams
    eval_seed = (
        mix_seed(cfg.seed, epoch, SALT_EVAL) if dist.rank == 0 else mix_seed(cfg.seed, epoch, SALT_EVAL, dist.rank)
    )
    eval_gen = torch.Generator(device=r.device).manual_seed(eval_seed)
    ev = evaluate(
        r.parts.eval_model(),
        *r.held,
        attack=cfg.eval_attack,
        batch_size=cfg.eval_batch_size,
        generator=eval_gen,
        dist=dist,
    )
    swa = {}
    if average is not None:  # its own starts: the student's evaluation is the same with or without it
        gen = torch.Generator(device=r.device).manual_seed(mix_seed(eval_seed, SALT_AVERAGE))
        sev = evaluate(
            average, *r.held, attack=cfg.eval_attack, batch_size=cfg.eval_batch_size, generator=gen, dist=dist
        )
        method = r.parts.method
        swa_best = sev["pgd20_acc"] > method.swa_best_acc  # main.py:785-812: the SWA student's own best
        method.swa_best_acc = max(method.swa_best_acc, sev["pgd20_acc"])
        swa = {**{f"swa_{k}": v for k, v in sev.items() if k != "eval_n"}, "swa_best": swa_best}
    r.parts.scheduler.step()
    is_best = ev["pgd20_acc"] > best_acc
    best_acc = max(best_acc, ev["pgd20_acc"])
    record = {
        "epoch": epoch + 1,
        "lr": lr,
        **{k: v for k, v in train_stats.items() if k != "batches"},
        **ev,
        "best": is_best,
        **swa,
    }
    record["world_size"] = dist.world_size  # trained this epoch (global batch: batch_size x this)
    generators = dist.all_gather_object(r.parts.generator.get_state())  # every rank's, for the checkpoint
    if dist.is_main:
        save = dict(
            model=module,
            optimizer=r.parts.optimizer,
            scheduler=r.parts.scheduler,
            epoch=epoch + 1,
            best_acc=best_acc,
            config=cfg.to_dict(),
            train_generator=r.parts.generator,
            loader_seed=cfg.seed,
            train_generators=generators,
            world_size=dist.world_size,
            method=r.parts.method,
        )
        # the SWA student in a checkpoint of the same form (evaluate and export read it), with its own best and
        # without the method's state (last.pt holds it: these are never resumed from)
        if average is not None:
            swa_save = {**save, "model": average, "method": None, "best_acc": r.parts.method.swa_best_acc}
        log = r.log
        logged = log.path.stat().st_size if log.path.exists() else 0
        try:
            if is_best:
                save_checkpoint(run_dir.best, **save)
            if swa.get("swa_best"):
                save_checkpoint(run_dir.swa_best, **swa_save)
            log.append(record)
            if r.tb is not None:  # before last.pt: a resume redoes this epoch's events with its line
                r.tb.epoch(record)
            if average is not None:
                save_checkpoint(run_dir.swa_last, **swa_save)
            save_checkpoint(run_dir.last, **save)
        except (OSError, WriteError) as e:
            # no metrics line without its last.pt (truncating needs no free space); a best.pt of
            # this epoch is redone on resume, as after a kill between the two writes
            with contextlib.suppress(OSError):
                os.truncate(log.path, logged)
            # a failed metrics append carries no file name (a write or flush of an open file)
            what = str(e) if isinstance(e, WriteError) else f"cannot write {e.filename or log.path}: {e.strerror}"
            # in epoch 1 best.pt may have been written just before: say only what a resume needs
            kept = _kept(r, epoch) if epoch else "no last.pt was written"
            raise WriteError(f"epoch {epoch + 1}: {what}; {kept}") from None
        plot_curves(
            records + [record], run_dir.curves, title=f"{cfg.method} {cfg.student} ({cfg.preset}, seed {cfg.seed})"
        )
        _log(
            f"[{tag}] epoch {epoch + 1}/{cfg.epochs}  lr {lr:.4g}  loss {record['train_loss']:.4f}  "
            f"clean {100 * ev['clean_acc']:.2f}%  PGD-20 {100 * ev['pgd20_acc']:.2f}%  "
            f"({record['epoch_time_s']:.0f}s train, {ev['eval_time_s']:.0f}s eval, "
            f"{record['images_per_s']:.0f} img/s"
            + (f", SWA clean {100 * swa['swa_clean_acc']:.2f}% PGD-20 {100 * swa['swa_pgd20_acc']:.2f}%" if swa else "")
            + (
                f", teacher cache {100 * record['teacher_cache_hit_rate']:.1f}% hits, "
                f"{record['teacher_forwards_saved']} forwards saved"
                if "teacher_cache_hit_rate" in record
                else ""
            )
            + ")",
            dist,
        )
    return record, best_acc
