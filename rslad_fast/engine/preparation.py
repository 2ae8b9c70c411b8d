"""Phase 1 of a run: every check that can fail on user input (data present and large enough, teacher file
readable and of the right architecture, loader usable on the device, the teacher cache's fit) and the
loading it needs. Writes nothing, so bad input never leaves a half-written run directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from rslad_fast import methods
from rslad_fast.data import load_cifar, num_views
from rslad_fast.data.loaders import dali_available
from rslad_fast.errors import UserError

from . import tb_log
from .config import Config
from .dist import Dist
from .resolution import check_ops_device
from .teacher import load_teacher
from .teacher_cache import check_fits
from .validation import split


@dataclass
class Prepared:
    """A validated config plus what the run needs in memory (uint8 CPU tensors, a loaded teacher)."""

    cfg: Config
    train: tuple  # (images uint8 [N, 3, 32, 32], labels int64 [N])
    held: tuple  # the first eval_n test images and labels; with val_n, the held-out training images
    teacher_model: Optional[torch.nn.Module] = None  # --teacher PATH, loaded and frozen (CPU)
    teacher_prep: Optional["Prepared"] = None  # the self-trained teacher's run
    nat_teacher_model: Optional[torch.nn.Module] = None  # MTARD's --nat-teacher PATH, loaded and frozen (CPU)
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
    test set; with ``val_n``, the validation images, taken out of the training set first), checked against
    what ``full`` holds.

    The rule shared with ``evaluate --n``: an ``eval_n`` the user gave (``eval_n_given``; a resumed run's
    config.json counts as given) that exceeds the test set is an error; the preset's default shrinks to the
    whole test set (``cfg.eval_n`` is set to it, so config.json records what runs), said in ``notes``."""
    (train_x, train_y), (test_x, test_y) = full
    # --val-n: the held-out images leave the training set before anything else takes from it (validation.py)
    (train_x, train_y), val = split((train_x, train_y), cfg.val_n)
    if cfg.train_n is not None:
        if cfg.train_n > len(train_x):
            left = f" left after --val-n {cfg.val_n}" if val is not None else ""
            raise UserError(f"--train-n {cfg.train_n} exceeds the {len(train_x)} training images{left} in {cfg.data}")
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
    return (train_x, train_y), val if val is not None else (test_x[: cfg.eval_n], test_y[: cfg.eval_n])


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
    if cfg.tensorboard:
        tb_log.require()  # the optional package: one line now, not a traceback after the first epoch
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
    if cfg.nat_teacher is not None:  # MTARD's natural teacher: always a file, loaded as --teacher's
        nat = cfg.nat_teacher
        prep.nat_teacher_model = load_teacher(
            nat["path"],
            nat["arch"],
            "cpu",
            num_classes=cfg.num_classes,
            dtype=cfg.teacher_dtype,
            normalization=cfg.wrn70_16_norm,
            role="--nat-teacher",
        )
        digest = file_sha256(nat["path"])
        if nat.get("sha256") is None:
            nat["sha256"] = digest
        elif nat["sha256"] != digest:
            raise UserError(
                f"--nat-teacher {nat['path']} changed since the run started (sha256 {digest[:12]}... vs "
                f"{nat['sha256'][:12]}... in config.json)"
            )
    external = [f for f, t in (("--teacher", cfg.teacher), ("--nat-teacher", cfg.nat_teacher)) if _from_file(t)]
    if cfg.val_n is not None and external:
        notes.append(
            f"--val-n {cfg.val_n}: the student never trains on the held-out images, but the {' and '.join(external)} "
            f"file was trained elsewhere, perhaps on them (a public CIFAR-10 teacher has seen all 50,000 training "
            f"images): best.pt is then picked on images the teacher may know; a self-trained teacher (no --teacher) "
            f"holds them out too"
        )
    prep.teacher_cache = use_teacher_cache(cfg, len(train[0]), notes)
    return prep


def _from_file(teacher: Optional[dict]) -> bool:
    return teacher is not None and teacher.get("source", "file") == "file"


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
