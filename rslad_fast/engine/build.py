"""The one builder of what a training step needs, from a :class:`Config`: the device set up, the seeded
student in its memory format, the teacher cast and placed, SGD, the lr schedule, the method and the attacks'
generator. The runner, the time estimate (``estimate.measure_train_step``) and the benchmarks all build here,
so what is timed is what trains."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rslad_fast import methods
from rslad_fast.methods.mtard import TwoTeachers
from rslad_fast.models import build as build_model
from rslad_fast.models.fold import FoldedCopy, fold_bn

from .allocator import keep_freed_memory
from .config import Config
from .step import AMP_DTYPES, train_step
from .teacher import CastTeacher, cast_teacher, freeze


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def setup_device(cfg: Config, device: torch.device) -> None:
    """The process-wide settings a run trains under: its thread count, the allocator, cuDNN autotuning."""
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # CPU: ~2x faster steps on glibc (see allocator.py)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def place_teacher(teacher: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """A frozen teacher in the run's teacher dtype (``--teacher-dtype``; a loaded teacher file is cast
    already), device and memory format; MTARD's pair (:class:`TwoTeachers`) member by member."""
    if isinstance(teacher, TwoTeachers):
        return TwoTeachers(place_teacher(teacher.adv, cfg, device), place_teacher(teacher.nat, cfg, device))
    if not isinstance(teacher, CastTeacher):
        teacher = cast_teacher(teacher, cfg.teacher_dtype)
    teacher = teacher.to(device).to(memory_format=memory_format(cfg))
    # frozen and only ever run in eval mode: fold once (in its dtype and memory format)
    return fold_bn(teacher) if cfg.fold_bn else teacher


def random_teacher(cfg: Config) -> torch.nn.Module:
    """A frozen teacher of ``cfg.teacher``'s architecture with random weights, for timing (MTARD: the pair
    of it and one of ``cfg.nat_teacher``'s architecture)."""

    if cfg.teacher is None:
        raise ValueError(f"method {cfg.method} needs a teacher, cfg.teacher is None")
    teacher = freeze(build_model(cfg.teacher["arch"], cfg.num_classes, normalization=cfg.wrn70_16_norm))
    if cfg.nat_teacher is not None:
        nat = freeze(build_model(cfg.nat_teacher["arch"], cfg.num_classes, normalization=cfg.wrn70_16_norm))
        teacher = TwoTeachers(teacher, nat)
    return teacher


@dataclass
class Parts:
    """The objects of :func:`train_step` (``engine/step.py``), as :func:`build_parts` makes them."""

    device: torch.device
    student: torch.nn.Module  # the plain module (the runner wraps it for DDP)
    teacher: Optional[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    method: methods.Method
    generator: torch.Generator  # the attacks' random starts
    amp_dtype: Optional[torch.dtype]
    fold: Optional[FoldedCopy] = None  # the student's folded copy for its eval-mode attack (cfg.fold_bn)
    fold_bn: bool = False  # cfg.fold_bn: the per-epoch evaluation attacks a folded copy too
    eval_fold: Optional[FoldedCopy] = None  # its fp32 copy where ``fold`` is absent or in the autocast dtype

    def eval_model(self) -> torch.nn.Module:
        """The model the per-epoch evaluation attacks: the plain student, or with ``--fold-bn`` a folded copy
        refreshed from the current weights and statistics (PGD-20's 21 eval-mode passes then skip every
        folded BatchNorm; equal up to float rounding, as in the training attack). It stays fp32: the attack's
        copy serves when it is fp32, else an fp32 copy is made once. ``evaluate`` (Table 2) never folds."""
        if not self.fold_bn:
            return self.student
        fold = self.fold
        if fold is None or next(fold.module.parameters()).dtype != torch.float32:
            if self.eval_fold is None:
                self.eval_fold = FoldedCopy(self.student)
            fold = self.eval_fold
        return fold.refresh()

    def step(self, x: torch.Tensor, y: torch.Tensor, *, cache=None, views=None):
        """One :func:`step.train_step` on (x, y) with these objects (the single-process step the estimate,
        the benchmarks and the tests time; the training loop passes its DDP-wrapped student itself)."""
        return train_step(
            self.student,
            self.method,
            self.optimizer,
            x,
            y,
            teacher=self.teacher,
            generator=self.generator,
            amp_dtype=self.amp_dtype,
            cache=cache,
            views=views,
            fold=self.fold,
        )


def build_parts(cfg: Config, device: torch.device, teacher: Optional[torch.nn.Module], *, generator_seed: int) -> Parts:
    """The seeded student (``cfg.seed``: the same initial weights on every rank and either memory format)
    and its optimizer, schedule, method and generator; ``teacher`` (frozen, any dtype, or None) placed as
    :func:`place_teacher` does."""
    if teacher is not None:
        teacher = place_teacher(teacher, cfg, device)
    method = methods.get(cfg.method)(**cfg.hparams)
    seed_everything(cfg.seed)
    student = build_model(cfg.student, cfg.num_classes, normalization=cfg.wrn70_16_norm).to(device)
    student = student.to(memory_format=memory_format(cfg))  # after the seeded init
    # PeerAiD's SWA student: a copy with plain BatchNorm (before --sync-bn), drawing nothing from the RNG
    average = copy.deepcopy(student) if getattr(method, "swa", False) else None
    if cfg.sync_bn:  # same parameters and buffers, same state_dict keys: checkpoints load either way
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if hasattr(method, "follow_lr_schedule"):  # MTARD's adaptive weights decay their lr with the run's lr
        method.follow_lr_schedule(cfg.milestones, cfg.gamma)
    if average is not None:
        first = method.first_average_epoch()
        if first is not None and first < cfg.epochs:  # only a run that averages keeps (and checkpoints) one
            method.bind_average(average)
    if hasattr(method, "bind_peer"):  # PeerAiD's peer: the student's architecture, initialised right after it
        peer = build_model(cfg.student, cfg.num_classes, normalization=cfg.wrn70_16_norm).to(device)
        method.bind_peer(peer.to(memory_format=memory_format(cfg)))
    if getattr(method, "needs_nat_teacher", False) and not isinstance(teacher, TwoTeachers):
        raise ValueError(f"method {cfg.method} needs its two teachers as one TwoTeachers module")
    # only where the official attack runs the student in eval mode (a train-mode attack, ARD's or SAT's
    # attack_mode=train, needs the BatchNorms); built after the final device and memory format
    fold = FoldedCopy(student) if cfg.fold_bn and method.has_attack and method.attack_mode == "eval" else None
    amp_dtype = AMP_DTYPES[cfg.amp]
    if fold is not None and amp_dtype is not None:
        # the copy's weights in the autocast dtype, cast once per refresh: autocast caches its casts only for
        # weights that require grad, so each of the attack's passes would cast the fp32 copy again (the
        # values are those autocast would make: the fold is computed in fp32 and rounded once)
        fold.module.to(amp_dtype)
    return Parts(
        device=device,
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        scheduler=scheduler,
        method=method,
        generator=torch.Generator(device=device).manual_seed(generator_seed),
        amp_dtype=amp_dtype,
        fold=fold,
        fold_bn=cfg.fold_bn,
    )
