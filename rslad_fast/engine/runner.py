"""A whole training run: check everything, then create the run directory, then train epoch by epoch.

Two phases, so that bad input never leaves a half-written run directory:

1. :func:`prepare` does every check that can fail on user input (data present and large enough, teacher
   file readable and of the right architecture, loader usable on the device) and loads what the run needs.
   It writes nothing.
2. :func:`create_run_dir` then :func:`run` write and train. ``run`` both starts and resumes: when the run
   directory holds a ``last.pt`` it continues from it, bit for bit (see ``checkpoint.py``).

Run directory layout::

    config.json      the resolved Config (written before training starts)
    metrics.jsonl    one line per completed epoch (metrics.py)
    curves.png       loss / accuracy / lr curves, redrawn after each epoch
    last.pt          checkpoint after the latest epoch (checkpoint.py)
    best.pt          checkpoint of the epoch with the best held-out PGD-20 accuracy
    teacher/         the self-trained teacher's own run directory (distillation without --teacher)
    .lock            flock'ed by the process working in the directory, for the whole run (RunLock)

Per epoch, the writes happen in the order best.pt, metrics line, last.pt, curves.png: a run killed between
any two of them resumes from the previous last.pt, drops the metrics lines after it and redoes the epoch,
which produces the same weights again.

Under torchrun (see ``dist.py``) every rank runs all of this: each checks and loads everything, builds the
same seeded student, restores the same checkpoint, trains its shard through DDP and evaluates its slice of
the held images; only rank 0 writes (config, metrics, curves, checkpoints, the teacher's run directory).
The other ranks wait at a barrier at the end of :func:`run` until rank 0's last files are complete, which is
how a self-trained teacher is written once by rank 0 and then loaded by every rank.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from rslad_fast import methods
from rslad_fast.data import load_cifar, make_loader, num_views
from rslad_fast.data.loaders import SALT_ATTACK, SALT_EVAL, dali_available, mix_seed
from rslad_fast.errors import UserError
from rslad_fast.models import build
from rslad_fast.models.loading import load_checkpoint_into

from . import estimate
from .allocator import keep_freed_memory
from .checkpoint import WriteError, atomic_write_bytes, load_checkpoint, restore, save_checkpoint, saved_world_size
from .config import Config, check_ops_device, read_config_file, validate
from .dist import Dist
from .loop import Diverged, evaluate, first_non_finite, train_one_epoch
from .metrics import MetricsLog, plot_curves
from .precision import tf32
from .step import AMP_DTYPES
from .teacher import cast_teacher, freeze, load_teacher
from .teacher_cache import TeacherCache, check_fits

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
LAST = "last.pt"
BEST = "best.pt"
LOCK = ".lock"  # flock'ed for the life of a run (RunLock)


@dataclass
class Prepared:
    """A validated config plus what the run needs in memory (uint8 CPU tensors, a loaded teacher)."""

    cfg: Config
    train: tuple  # (images uint8 [N, 3, 32, 32], labels int64 [N])
    held: tuple  # the first eval_n test images and labels
    teacher_model: Optional[torch.nn.Module] = None  # --teacher PATH, loaded and frozen (CPU)
    teacher_prep: Optional["Prepared"] = None  # the self-trained teacher's run
    notes: list = field(default_factory=list)  # what the checks adjusted, for the user to read
    teacher_cache: bool = False  # cfg.teacher_cache resolved: the cache is used


# ---- phase 1: checks and loading, no writes --------------------------------------------------------------


def read_data(cfg: Config, download="auto") -> tuple:
    """All of the run's data set (CIFAR-10 or CIFAR-100) as uint8 CPU tensors: ((train_x, train_y), (test_x,
    test_y))."""
    return (
        load_cifar(cfg.data, train=True, dataset=cfg.dataset, download=download),
        load_cifar(cfg.data, train=False, dataset=cfg.dataset, download=download),
    )


def select_data(cfg: Config, full: tuple, *, eval_n_given: bool = True, notes: Optional[list] = None) -> tuple:
    """The run's training images (the first ``train_n``) and held-out images (the first ``eval_n`` of the
    test set), checked against what ``full`` holds.

    The rule shared with ``evaluate --n``: an ``eval_n`` the user gave (``eval_n_given``; a resumed run's
    config.json counts as given) that exceeds the test set is an error; the preset's default shrinks to the
    whole test set (``cfg.eval_n`` is set to it, so config.json records what runs), said in ``notes``."""
    (train_x, train_y), (test_x, test_y) = full
    if cfg.train_n is not None:
        if cfg.train_n > len(train_x):
            raise UserError(f"--train-n {cfg.train_n} exceeds the {len(train_x)} training images in {cfg.data}")
        train_x, train_y = train_x[: cfg.train_n], train_y[: cfg.train_n]
    if cfg.eval_n > len(test_x):
        if eval_n_given:
            raise UserError(f"--eval-n {cfg.eval_n} exceeds the {len(test_x)} test images in {cfg.data}")
        if notes is not None:
            notes.append(
                f"the test set in {cfg.data} holds {len(test_x)} images, fewer than the preset's "
                f"{cfg.eval_n} held-out images: the whole test set ({len(test_x)}) is evaluated per epoch"
            )
        cfg.eval_n = len(test_x)
    if cfg.batch_size > len(train_x):
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(train_x)} training images")
    return (train_x, train_y), (test_x[: cfg.eval_n], test_y[: cfg.eval_n])


def prepare(cfg: Config, *, download="auto", full=None, eval_n_given: bool = True) -> Prepared:
    """All checks that can fail on user input, and the loading they need. Writes nothing.

    ``full``: the data set as :func:`read_data` returns it, when already read (the self-trained teacher reuses
    the student's copy and takes its own ``train_n`` of it). A teacher file's sha256 is added to
    ``cfg.teacher`` (new run) or checked against it (resume). ``eval_n_given``: see :func:`select_data`."""
    check_ops_device(cfg.device)  # new run and resume alike (the build may have changed in between)
    if cfg.loader == "dali":
        if not torch.device(cfg.device).type == "cuda":
            raise UserError("--loader dali trains on a CUDA device only; use --loader torch on the CPU")
        if not dali_available():
            raise UserError(
                "--loader dali needs NVIDIA DALI, which is not importable; install "
                "nvidia-dali-cuda130 or use --loader torch"
            )
    full = full if full is not None else read_data(cfg, download)
    notes = []
    train, held = select_data(cfg, full, eval_n_given=eval_n_given, notes=notes)
    prep = Prepared(cfg=cfg, train=train, held=held, notes=notes)
    if cfg.teacher is not None:
        if cfg.teacher["source"] == "file":
            prep.teacher_model = load_teacher(
                cfg.teacher["path"],
                cfg.teacher["arch"],
                "cpu",
                num_classes=cfg.num_classes,
                dtype=cfg.teacher_dtype,
                normalization=cfg.wrn70_16_norm,
            )
            digest = file_sha256(cfg.teacher["path"])
            if cfg.teacher.get("sha256") is None:  # a new run records which file it distills from
                cfg.teacher["sha256"] = digest
            elif cfg.teacher["sha256"] != digest:  # a resumed run must distill from the very same file
                raise UserError(
                    f"teacher {cfg.teacher['path']} changed since the run started (sha256 "
                    f"{digest[:12]}... vs {cfg.teacher['sha256'][:12]}... in config.json)"
                )
        else:
            try:
                prep.teacher_prep = prepare(
                    Config.from_dict(cfg.teacher_run), download=download, full=full, eval_n_given=eval_n_given
                )
            except UserError as e:  # its settings come partly from the preset: say whose they are
                raise UserError(f"self-trained teacher ({cfg.teacher['arch']}, TRADES): {e}") from None
            cfg.teacher_run["eval_n"] = prep.teacher_prep.cfg.eval_n  # as shrunk: what a resume compares
    prep.teacher_cache = use_teacher_cache(cfg, len(train[0]), notes)
    return prep


def use_teacher_cache(cfg: Config, num_images: int, notes: list) -> bool:
    """Whether the run uses the teacher-logit cache: ``on``, or ``auto`` for a Method.TEACHER_CACHE_AUTO
    method, and it fits in memory. ``on`` that does not fit is a UserError; ``auto`` then trains uncached,
    said in ``notes`` (as is the cache's size when used). Sized for the loaders' default crop padding."""
    if cfg.teacher is None or cfg.teacher_cache == "off":
        return False
    if cfg.teacher_cache == "auto" and not methods.get(cfg.method).TEACHER_CACHE_AUTO:
        return False
    views = num_views()
    dist = Dist.from_env()
    device = dist.device(cfg.device)  # this rank's own GPU under torchrun (cuda:LOCAL_RANK), not the current one
    processes = dist.local_world_size if device.type == "cpu" else 1
    why = check_fits(num_images, views, cfg.num_classes, device, processes)
    if why is not None:
        if cfg.teacher_cache == "on":
            raise UserError(f"--teacher-cache on: {why}; train with --teacher-cache off")
        notes.append(f"{why}: training without it (--teacher-cache auto)")
        return False
    return True


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(run_dir) -> Config:
    """The Config of an existing run directory (for --resume)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such directory")
    if not path.is_file():
        if not _content(run_dir):
            raise UserError(
                f"--resume {run_dir}: no {CONFIG} there (a start interrupted before it was written); "
                f"start the run again with --out {run_dir}"
            )
        raise UserError(f"--resume {run_dir}: no {CONFIG} there, not a run directory")
    try:
        d = read_config_file(path)  # the one reader of config.json, shared with evaluate --run
    except UserError as e:
        raise UserError(f"--resume {run_dir}: {e}") from None
    try:
        cfg = Config.from_dict(d)
        validate(cfg)  # a config.json edited by hand gets the checks a new run's flags get
    except UserError as e:
        raise UserError(f"--resume {run_dir}: {CONFIG}: {e}") from None
    return cfg


def _no_content(name: str) -> bool:
    """A file of ours that is no part of a run: the lock, or the temporary of an atomic write that a killed
    process left (``.NAME.tmp-PID``, see checkpoint.atomic_write)."""
    return name == LOCK or re.fullmatch(r"\..+\.tmp-\d+", name) is not None


def _content(run_dir: Path) -> list:
    return [p for p in run_dir.iterdir() if not _no_content(p.name)]


def check_out_dir(run_dir, overwrite: bool) -> None:
    """Refuse to start a new run in a non-empty directory unless --overwrite (and then only a run dir).
    A folder holding only the lock and stale temporaries (a start killed while writing config.json) is
    empty."""
    run_dir = Path(run_dir)
    try:
        if os.path.lexists(run_dir) and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} exists and is not a directory")
        _check_writable(run_dir)
        if run_dir.is_dir() and _content(run_dir):
            if not overwrite:
                raise UserError(
                    f"--out {run_dir} already exists and is not empty; pass --resume {run_dir} to "
                    f"continue that run, or --overwrite to replace it"
                )
            if not (run_dir / CONFIG).is_file():
                raise UserError(
                    f"--out {run_dir} is not empty and holds no {CONFIG}: not a run directory, "
                    f"refusing to delete it even with --overwrite"
                )
    except OSError as e:
        raise UserError(f"--out {run_dir}: {e.strerror or e}") from None


def _check_writable(run_dir: Path) -> None:
    """RUN_DIR can be made (or written) here: no file where a folder must be, a writable folder, names the
    file system takes. Checked before anything is written, so that these fail with one line up front."""
    missing, p = [], Path(os.path.abspath(run_dir))
    while not os.path.isdir(p):
        if os.path.lexists(p):
            raise UserError(f"--out {run_dir}: {p} is a file, not a folder")
        missing.append(p.name)
        p = p.parent
    try:
        limit = os.pathconf(p, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in missing:
        size = len(os.fsencode(name))
        if size > limit:
            raise UserError(
                f"--out {run_dir}: the name {name[:16]}... is {size} bytes, over the file system's limit of {limit}"
            )
    if not os.access(p, os.W_OK | os.X_OK):  # also False on a read-only file system, root included
        raise UserError(f"--out {run_dir}: {p} is not writable")


def _outermost_missing(run_dir: Path) -> Optional[Path]:
    """The outermost folder of RUN_DIR's path that does not exist yet (None: RUN_DIR exists)."""
    p, top = Path(os.path.abspath(run_dir)), None
    while not os.path.lexists(p):
        top, p = p, p.parent
    return top


def _remove_empty(run_dir: Path, created: Optional[Path]) -> None:
    """Undo a partial ``mkdir(parents=True)``: the empty folders from RUN_DIR up to ``created``."""
    p = Path(os.path.abspath(run_dir))
    while created is not None:
        try:
            os.rmdir(p)
        except OSError:
            return
        if p == created:
            return
        p = p.parent


# ---- phase 2: writes -------------------------------------------------------------------------------------


def write_config(run_dir, cfg: Config) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())


class RunLock:
    """RUN_DIR's exclusive lock (``fcntl.flock`` on RUN_DIR/.lock), held until :meth:`close` or until the
    process ends, however it ends (the kernel drops a dead process's flock; the file it leaves behind is
    no content and locks nothing). Rank 0 only: a directory in use by another process (training, resuming
    or being overwritten) is a UserError."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self._file = None
        if fcntl is None:  # no flock on this platform: run unlocked
            return
        while True:
            try:
                f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
            except OSError as e:
                raise UserError(f"{run_dir}: cannot create its lock file {LOCK} ({e.strerror})") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = f.read().strip()
                f.close()
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise UserError(
                        f"{run_dir} is in use by another process"
                        f"{f' (pid {holder})' if holder.isdigit() else ''}; wait until it ends or "
                        f"use another --out"
                    ) from None
                raise UserError(f"{run_dir}: cannot lock {LOCK} ({e.strerror})") from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(f.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            f.close()  # locked the file its last holder removed on release (see close): take the new one
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")  # for the message above
        f.flush()
        self._file = f

    def close(self) -> None:
        """Release the lock, removing the file while still holding it (a process that opened the old file
        meanwhile sees that its name is gone and opens the new one)."""
        if self._file is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        self._file.close()
        self._file = None


def create_run_dir(run_dir, cfg: Config, *, overwrite: bool = False, dist: Dist = Dist()):
    """Create (or, with overwrite, empty) the run directory, lock it and write config.json. Rank 0 only
    (other ranks: None). Returns the :class:`RunLock`: close it when the run ends."""
    run_dir = Path(run_dir)
    if not dist.is_main:
        return None
    created = _outermost_missing(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
    except (OSError, UserError) as e:
        _remove_empty(run_dir, created)
        if isinstance(e, UserError):
            raise
        raise UserError(f"--out {run_dir}: cannot create it ({e.strerror or e})") from None
    try:
        check_out_dir(run_dir, overwrite)  # again, under the lock: what another process did meanwhile counts
        for child in run_dir.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        write_config(run_dir, cfg)
    except BaseException as e:
        if created is not None:  # made by this call and locked by it: no half-made run directory stays
            shutil.rmtree(created, ignore_errors=True)
        lock.close()
        if isinstance(e, OSError):
            raise UserError(f"--out {run_dir}: {e.strerror or e}") from None
        raise
    return lock


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _same_run(a: dict, b: dict) -> bool:
    def norm(d):  # a config written before a field existed reads as having the field's default
        try:
            return Config.from_dict(dict(d)).to_dict()
        except (UserError, TypeError):
            return d

    ignore = ("versions",)
    a, b = norm(a), norm(b)
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def _log(msg: str, dist: Dist) -> None:
    if dist.is_main:
        from tqdm import tqdm

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
        return _run(prep, Path(run_dir), dist=dist, progress=progress, tag=tag, stop_after=stop_after, then=then)


def _run(
    prep: Prepared,
    run_dir: Path,
    *,
    dist: Dist,
    progress: bool,
    tag: str,
    stop_after: Optional[int],
    then: Optional[str] = None,
) -> dict:
    """:func:`run`'s steps: build, resume, then train and close each epoch; the time estimate once the
    first batches of this process are timed (rank 0)."""
    from tqdm import tqdm

    cfg = prep.cfg
    r = _build(prep, run_dir, dist=dist, progress=progress)
    start, best_acc, records = _resume(r, dist=dist, tag=tag)
    if r.teacher_cache is not None and start < cfg.epochs:
        _log(
            f"[{tag}] teacher-logit cache: {r.teacher_cache.describe()}, filled as the views are drawn "
            f"(each view's teacher forward runs once)",
            dist,
        )
    if start >= cfg.epochs:
        _log(f"[{tag}] already complete ({start}/{cfg.epochs} epochs) in {run_dir}", dist)
        dist.barrier()
        return {**(records[-1] if records else {}), "best_acc": best_acc}
    student = dist.wrap(r.module, r.device)  # after the restore: every rank starts from the same weights

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
    record = {}
    try:
        for epoch in range(start, cfg.epochs):
            lr = r.optimizer.param_groups[0]["lr"]
            bar.set_description(f"{tag} ep {epoch + 1}/{cfg.epochs}")
            try:
                train_stats = train_one_epoch(
                    student=student,
                    method=r.method,
                    loader=r.loader,
                    optimizer=r.optimizer,
                    epoch=epoch,
                    teacher=r.teacher,
                    generator=r.generator,
                    bar=bar,
                    amp_dtype=AMP_DTYPES[cfg.amp],
                    channels_last=cfg.channels_last,
                    dist=dist,
                    teacher_cache=r.teacher_cache,
                    on_batch=timer if epoch == start and dist.is_main else None,
                )
            except Diverged as e:
                raise Diverged(f"{e}; {_kept(r, epoch)}; a lower --lr may help") from None
            record, best_acc = _end_of_epoch(r, epoch, lr, train_stats, best_acc, records, dist=dist, tag=tag)
            records.append(record)
            if stop_after is not None and epoch + 1 >= stop_after:
                break
    finally:
        bar.close()
    dist.barrier()  # rank 0's files of this run are complete before any rank goes on (and reads them)
    return {**record, "best_acc": best_acc}


def _log_estimate(r: "_Training", step_s: float, epochs: int, batches: int, *, dist: Dist, tag: str, then) -> None:
    """The run's time estimate from its measured seconds per batch, plus one timed evaluation pass on the
    student itself (its weights, modes and the RNG streams untouched: the run stays bitwise the same)."""
    cfg = r.cfg
    images = math.ceil(len(r.held[0]) / dist.world_size)  # this rank's slice of the held-out set
    eval_s = estimate.measure_eval_seconds(cfg, images=images, model=r.module, device=r.device)
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
    """What :func:`_run` trains with, as :func:`_build` makes it (``module``: the plain student)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    teacher: Optional[torch.nn.Module]
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    generator: torch.Generator  # the attacks' random starts
    method: methods.Method
    loader: object
    held: tuple  # the held-out images and labels, on the device
    log: MetricsLog
    teacher_cache: Optional[TeacherCache] = None  # derived state: never checkpointed, refilled after a resume


def _build(prep: Prepared, run_dir: Path, *, dist: Dist, progress: bool) -> _Training:
    """The device set up, the teacher ready (trained first when self-trained), and the seeded student with
    its optimizer, schedule, attack generator, method and loaders: what a new run starts from and a resumed
    one restores into."""
    cfg = prep.cfg
    device = dist.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # CPU: ~2x faster steps on glibc (see allocator.py)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    teacher = None
    if prep.teacher_model is not None:
        teacher = prep.teacher_model.to(device)
    elif prep.teacher_prep is not None:
        batches = estimate.batches_per_epoch(len(prep.train[0]), cfg.batch_size, dist.world_size)
        then = (
            f"the student's run follows: {cfg.method} {cfg.student}, {estimate.count(cfg.epochs, 'epoch')} x "
            f"{estimate.count(batches, 'batch')}"
        )
        teacher = ensure_teacher(
            prep.teacher_prep, run_dir / cfg.teacher["dir"], dist=dist, progress=progress, then=then
        )
        teacher = cast_teacher(teacher, cfg.teacher_dtype).to(device)

    seed_everything(cfg.seed)  # every rank: the same initial weights (DDP also broadcasts rank 0's)
    module = build(cfg.student, cfg.num_classes, normalization=cfg.wrn70_16_norm).to(device)
    if cfg.channels_last:  # after the seeded init: the same initial weights either way
        module = module.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    if cfg.sync_bn:  # same parameters and buffers, same state_dict keys: checkpoints load either way
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    generator = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, dist.rank, SALT_ATTACK))
    method = methods.get(cfg.method)(**cfg.hparams)
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
        device=device,
        teacher=teacher,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        method=method,
        loader=loader,
        held=held,
        log=MetricsLog(run_dir / METRICS),
        teacher_cache=cache,
    )


def _resume(r: _Training, *, dist: Dist, tag: str) -> tuple:
    """Continue from ``last.pt`` when the run directory holds one: model, optimizer, schedule and RNG states
    restored, the metrics lines after it dropped. Returns (completed epochs, best PGD-20 accuracy so far,
    the metrics records kept: rank 0's, [] on the other ranks)."""
    cfg, run_dir = r.cfg, r.run_dir
    start, best_acc = 0, -1.0
    if dist.is_main:
        for stale in run_dir.glob(".*.tmp-*"):  # left by a process killed mid-write (see checkpoint.py)
            stale.unlink()
    saved_world = dist.world_size
    if (run_dir / LAST).exists():
        ckpt = load_checkpoint(run_dir / LAST)
        if not _same_run(ckpt["config"], cfg.to_dict()):
            raise UserError(
                f"{run_dir / LAST} was written by a different configuration than {run_dir / CONFIG}; refusing to resume"
            )
        restore(
            ckpt,
            model=r.module,
            optimizer=r.optimizer,
            scheduler=r.scheduler,
            train_generator=r.generator,
            rank=dist.rank,
            path=run_dir / LAST,
            epochs=cfg.epochs,
        )
        start, best_acc = int(ckpt["epoch"]), float(ckpt["best_acc"])
        saved_world = saved_world_size(ckpt["rng"])
        del ckpt
    records = r.log.truncate_after(start) if dist.is_main else []
    if 0 < start < cfg.epochs:
        _log(f"[{tag}] resuming {run_dir} after epoch {start}/{cfg.epochs}", dist)
    if start < cfg.epochs and saved_world != dist.world_size:
        # The shards, per-rank batches and gradient averaging change with the world size, so this cannot be
        # bitwise any uninterrupted run; the attack streams are re-derived per (seed, rank, epoch) rather
        # than handing one saved rank's stream to several ranks.
        r.generator.manual_seed(mix_seed(cfg.seed, dist.rank, SALT_ATTACK, start))
        _log(
            f"[{tag}] last.pt was written by {saved_world} process(es), resuming with {dist.world_size}: model, "
            f"optimizer, lr schedule and epoch continue; not bitwise an uninterrupted run",
            dist,
        )
    return start, best_acc, list(records)


def _kept(r: _Training, epoch: int) -> str:
    """What a failure in epoch ``epoch`` (from 0) leaves to resume from."""
    return f"{r.run_dir / LAST} of epoch {epoch} is kept" if epoch else "no checkpoint was written"


def _end_of_epoch(
    r: _Training, epoch: int, lr: float, train_stats: dict, best_acc: float, records: list, *, dist: Dist, tag: str
) -> tuple:
    """After epoch ``epoch``'s training: the non-finite check, the held-out evaluation, the lr step, and
    (rank 0) best.pt, the metrics line, last.pt, the curves and the log line, in that order. Returns (the
    epoch's record, the best PGD-20 accuracy so far)."""
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
    # rank 0 draws the single-process stream; the other ranks, their own (seed, epoch, rank) streams
    eval_seed = (
        mix_seed(cfg.seed, epoch, SALT_EVAL) if dist.rank == 0 else mix_seed(cfg.seed, epoch, SALT_EVAL, dist.rank)
    )
    eval_gen = torch.Generator(device=r.device).manual_seed(eval_seed)
    ev = evaluate(
        module, *r.held, attack=cfg.eval_attack, batch_size=cfg.eval_batch_size, generator=eval_gen, dist=dist
    )
    r.scheduler.step()
    is_best = ev["pgd20_acc"] > best_acc
    best_acc = max(best_acc, ev["pgd20_acc"])
    record = {
        "epoch": epoch + 1,
        "lr": lr,
        **{k: v for k, v in train_stats.items() if k != "batches"},
        **ev,
        "best": is_best,
    }
    record["world_size"] = dist.world_size  # trained this epoch (global batch: batch_size x this)
    generators = dist.all_gather_object(r.generator.get_state())  # every rank's, for the checkpoint
    if dist.is_main:
        save = dict(
            model=module,
            optimizer=r.optimizer,
            scheduler=r.scheduler,
            epoch=epoch + 1,
            best_acc=best_acc,
            config=cfg.to_dict(),
            train_generator=r.generator,
            loader_seed=cfg.seed,
            train_generators=generators,
            world_size=dist.world_size,
        )
        log = r.log
        logged = log.path.stat().st_size if log.path.exists() else 0
        try:
            if is_best:
                save_checkpoint(run_dir / BEST, **save)
            log.append(record)
            save_checkpoint(run_dir / LAST, **save)
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
            records + [record], run_dir / CURVES, title=f"{cfg.method} {cfg.student} ({cfg.preset}, seed {cfg.seed})"
        )
        _log(
            f"[{tag}] epoch {epoch + 1}/{cfg.epochs}  lr {lr:.4g}  loss {record['train_loss']:.4f}  "
            f"clean {100 * ev['clean_acc']:.2f}%  PGD-20 {100 * ev['pgd20_acc']:.2f}%  "
            f"({record['epoch_time_s']:.0f}s train, {ev['eval_time_s']:.0f}s eval, "
            f"{record['images_per_s']:.0f} img/s"
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


def ensure_teacher(
    prep: Prepared, teacher_dir, *, dist: Dist, progress: bool, then: Optional[str] = None
) -> torch.nn.Module:
    """Train (or finish training, or just reuse) the self-trained teacher in ``teacher_dir``; load it.

    Under torchrun the teacher trains under DDP like any run; rank 0 writes its directory, every rank then
    loads ``teacher/last.pt`` once ``run`` has returned (its closing barrier: the file is complete). ``then``:
    see :func:`run`."""
    teacher_dir = Path(teacher_dir)
    cfg = prep.cfg
    # every rank checks (reads only), so that a mismatch stops all of them, not only rank 0
    if (teacher_dir / CONFIG).is_file():
        if not _same_run(read_config(teacher_dir).to_dict(), cfg.to_dict()):
            raise UserError(f"{teacher_dir / CONFIG} does not match this run's teacher configuration")
    elif dist.is_main:
        teacher_dir.mkdir(parents=True, exist_ok=True)
        write_config(teacher_dir, cfg)
    t0 = time.perf_counter()
    run(prep, teacher_dir, dist=dist, progress=progress, tag=f"teacher {cfg.method}/{cfg.student}", then=then)
    _log(f"[teacher] ready ({time.perf_counter() - t0:.0f}s): {teacher_dir / LAST}", dist)
    model = build(cfg.student, cfg.num_classes, normalization=cfg.wrn70_16_norm)
    load_checkpoint_into(model, teacher_dir / LAST, cfg.student)
    return freeze(model)
