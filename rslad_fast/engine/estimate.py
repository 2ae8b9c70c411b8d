"""How long a run or an evaluation will take on this machine, timed on the code that really runs.

- :func:`measure_train_step`: seconds per training batch of a resolved Config, through ``step.train_step`` (the
  training loop's and the benchmarks' step) on random CIFAR-shaped inputs and freshly built models.
- :func:`measure_eval_seconds`: one epoch's held-out evaluation (clean + PGD-20), from one timed pass.
- :func:`estimate_run`: the remaining epochs of a run, training and per-epoch evaluation.
- :func:`eval_attack_seconds`: ``python -m rslad_fast.evaluate`` on one checkpoint.
- :class:`FirstBatches`: the in-run timer of a run's first batches (``runner._run``'s estimate line).

Nothing here writes files, and every measurement leaves the global RNG streams (torch, CUDA, numpy, random),
the thread count and the cuDNN / TF32 flags as it found them, so a run that starts after it is bitwise the run
that would have started without it. A pass below is one forward plus the input gradient (what an attack step
costs); the models' weights do not change what a pass costs, so random ones are timed.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from rslad_fast import methods
from rslad_fast.attacks.pgd import model_mode
from rslad_fast.attacks.registry import EVAL_ATTACKS
from rslad_fast.models import build

from .build import build_parts, random_teacher, setup_device

# On a CPU, an estimate above this points to --preset quick: past a couple of hours a CPU run is the paper's
# schedule (weeks there), and the quick preset shows the whole pipeline in minutes.
CPU_POINTER_SECONDS = 2 * 3600
# The same pointer before anything is timed, for a CPU run of at least this many batches (teacher included):
# the timed estimate comes only after the first batches, which for the paper's WRN-34-10 TRADES teacher take
# minutes each on a CPU. The cheapest Table 2 step here (mnv2, batch 128, a 10-step attack) is ~15 s: 5,000
# batches are a day of CPU, the paper's mnv2 RSLAD with its teacher 147,016.
CPU_LONG_BATCHES = 5000
# README "The two commands": the quick preset measured end to end on this project's 2-core machine.
QUICK_PRESET_CPU = "about 17 min on 2 cores"
# Batches of a run the in-run estimate skips (CUDA graph capture, cuDNN autotuning, allocator growth) and then
# times; the line appears after WARMUP_BATCHES + TIMED_BATCHES batches.
WARMUP_BATCHES = 1
TIMED_BATCHES = 2

# AutoAttack (standard, l_inf; attacks/autoattack.py) in passes per image. APGD-CE runs on every clean-correct
# point; APGD-T, FAB-T and Square only on the points still robust, assumed to be AA_ROBUST_FRACTION of them
# (robust CIFAR-10 models of Table 2 keep 50-57% under AA, and more after APGD-CE alone: 0.6 errs high).
AA_ROBUST_FRACTION = 0.6
AA_APGD_CE = 100  # 100 iterations, 1 restart: one pass each
AA_APGD_T = 9 * 100  # 9 target classes x 100 iterations
AA_FAB_T = 9 * 100  # 9 targets x 100 iterations, each a pass for the target's gradient plus a forward
AA_SQUARE = 5000  # queries, each a forward; a still-robust point is never fooled, so it gets all of them


def fmt_duration(seconds: float) -> str:
    """'0.4 s', '45 s', '12 min', '3.4 h', '2.1 days'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def count(n: int, what: str) -> str:
    """'1 epoch', '300 epochs', '1 batch', '29,716 batches' (``what``: 'epoch' or 'batch')."""
    return f"{n:,} {what if n == 1 else {'batch': 'batches'}.get(what, what + 's')}"


def batches_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """One process's batches per epoch, as the loaders count them (shards padded to ceil(N / world_size))."""
    return math.ceil(math.ceil(num_images / world_size) / batch_size)


def device_text(device) -> str:
    """The device as the estimate line names it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def preserved_state(device, threads: Optional[int] = None):
    """Restore the global RNG streams, the thread count and the cuDNN / TF32 flags afterwards; run the block
    with ``threads`` intra-op threads (a run's own count: what it will train with)."""
    device = torch.device(device)
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_rng_state(cpu)
        np.random.set_state(npy)
        random.setstate(py)


def _model(cfg, arch: str) -> torch.nn.Module:
    """A freshly built ``arch`` as the run builds it: the data set's class count and WRN-70-16's input
    normalization where the Config has them (CIFAR-10's otherwise)."""

    norm = getattr(cfg, "wrn70_16_norm", None)
    return build(arch, getattr(cfg, "num_classes", 10), **({"normalization": norm} if norm else {}))


def _inputs(batch: int, device, channels_last: bool = False):
    """Random images in [0, 1] and labels, from a generator of their own (the global streams stay untouched)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 3, 32, 32), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)  # valid labels for 10 or 100 classes alike
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def measure_train_step(cfg, *, batches: int = 2, device=None) -> float:
    """Seconds per training batch of ``cfg`` (a resolved ``engine.config.Config``) on ``device`` (default
    ``cfg.device``) at ``cfg.batch_size``: ``step.train_step`` with the method's attack, ``cfg.amp``,
    ``cfg.channels_last`` and ``cfg.allow_tf32``, on a freshly built student and, for a distillation method, a
    frozen teacher of ``cfg.teacher``'s architecture with random weights; the mean of ``batches`` timed
    batches after one untimed warm-up batch. The teacher-logit cache is left out: its first epoch misses
    every view, and later epochs run faster than this by the teacher forwards it saves."""

    if batches < 1:
        raise ValueError(f"measure_train_step: batches must be >= 1, got {batches}")
    device = torch.device(device or cfg.device)
    with preserved_state(device, cfg.threads):
        setup_device(cfg, device)  # as the run does: the allocator (a CPU step is ~2x slower without it), cuDNN
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
        teacher = random_teacher(cfg) if cfg.teacher is not None else None
        p = build_parts(cfg, device, teacher, generator_seed=0)
        x, y = _inputs(cfg.batch_size, device, cfg.channels_last)

        def step():
            p.step(x, y)

        step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            step()
        sync(device)
        return (time.perf_counter() - t0) / batches


def _pass_seconds(model: torch.nn.Module, batch: int, device) -> tuple:
    """(seconds of a no-grad forward, seconds of a forward + input gradient) of ``model`` in eval mode, fp32,
    at ``batch`` contiguous images (how evaluation feeds them), each after one untimed warm-up. The model's
    modes, weights and gradients are left as they were (the gradient is the input's only)."""

    x, y = _inputs(batch, device)

    def forward():
        with torch.no_grad():
            model(x)

    def gradient():
        xg = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xg).float(), y, reduction="sum")
        torch.autograd.grad(loss, xg)

    out = []
    with model_mode(model, "eval"):
        for fn in (forward, gradient):
            fn()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return tuple(out)


def measure_eval_seconds(cfg, *, images: int, model: Optional[torch.nn.Module] = None, device=None) -> float:
    """Seconds of one epoch's held-out evaluation of ``images`` images (``loop.evaluate``: per batch a clean
    forward, ``cfg.eval_attack['steps']`` PGD passes, a forward on x_adv), from one timed pass at
    ``cfg.eval_batch_size``, scaled to ``images``. ``model``: the run's own student (its weights and modes are
    left untouched), else a freshly built ``cfg.student``. fp32 under ``cfg.allow_tf32``, as the run evaluates."""

    if images <= 0:
        return 0.0
    device = torch.device(device or cfg.device)
    batch = min(cfg.eval_batch_size, images)
    with preserved_state(device, cfg.threads):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
        if model is None:
            model = _model(cfg, cfg.student).to(device)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
        fwd, grad = _pass_seconds(model, batch, device)
    return (int(cfg.eval_attack["steps"]) * grad + 2 * fwd) * images / batch


def estimate_run(
    cfg, step_seconds: float, batches_per_epoch: int, epochs_left: int, *, eval_seconds: Optional[float] = None
) -> float:
    """Seconds for ``epochs_left`` more epochs of ``batches_per_epoch`` batches at ``step_seconds`` each, plus
    each epoch's held-out evaluation: ``eval_seconds`` per epoch, or :func:`measure_eval_seconds` of
    ``cfg.held_n`` images when None, and that again for each epoch that also evaluates PeerAiD's SWA student
    (:func:`averaged_epochs`). Checkpoint writes, the curves and the SWA student's BatchNorm pass (one forward
    pass over the training images) are left out."""
    if eval_seconds is None:
        eval_seconds = measure_eval_seconds(cfg, images=cfg.held_n)
    epochs_left = max(epochs_left, 0)
    return (
        epochs_left * (batches_per_epoch * step_seconds + eval_seconds)
        + averaged_epochs(cfg, epochs_left) * eval_seconds
    )


def averaged_epochs(cfg, epochs_left: int) -> int:
    """Of the last ``epochs_left`` epochs, those after which the method evaluates a second model too
    (``Method.after_epoch``: PeerAiD's SWA student, from its first average epoch on)."""
    method = methods.get(cfg.method)(**cfg.hparams)
    if not getattr(method, "swa", False):
        return 0
    method.follow_lr_schedule(cfg.milestones, cfg.gamma)
    first = method.first_average_epoch()
    if first is None:
        return 0
    return max(0, cfg.epochs - max(first, cfg.epochs - epochs_left))


def attack_passes(name: str, *, clean: float = 1.0, robust: float = AA_ROBUST_FRACTION) -> tuple:
    """(passes, forwards) per image of ``evaluate``'s attack ``name`` at its standard settings: each attack's
    steps (its ``steps`` default in ``EVAL_ATTACKS``; FGSM one step) plus the forward its accuracy is counted
    from. AutoAttack: see the AA_* constants; APGD-CE runs on the ``clean`` fraction of the points that the
    model classifies correctly, the later attacks on the ``robust`` fraction still standing after it (default
    AA_ROBUST_FRACTION; a trained run's own PGD-20 accuracy is the better guess); an upper-bound-ish count
    (every iteration a full pass, no early stop but Square's on fooled points)."""

    if name not in EVAL_ATTACKS:
        raise ValueError(f"unknown attack {name!r}; one of {', '.join(EVAL_ATTACKS)}")
    if name == "clean":
        return 0, 1
    if name == "aa":
        return clean * AA_APGD_CE + robust * (AA_APGD_T + AA_FAB_T), 1 + robust * (AA_FAB_T + AA_SQUARE)
    entry = EVAL_ATTACKS[name]
    steps = entry.default("steps") if "steps" in inspect.signature(entry.make).parameters else 1
    return int(steps), 1


def eval_attack_seconds(
    arch: str,
    attacks: Iterable[str],
    n: int,
    device,
    batch: int,
    *,
    num_classes: int = 10,
    clean: float = 1.0,
    robust: float = AA_ROBUST_FRACTION,
) -> float:
    """Estimated seconds of ``python -m rslad_fast.evaluate`` on one checkpoint of ``arch``: ``n`` images,
    ``attacks`` (names of ``EVAL_ATTACKS``; clean always runs, as evaluate adds it) at their standard settings,
    ``batch`` images per batch on ``device``. One timed no-grad forward and one forward + input gradient of
    the architecture on random data at ``min(batch, n)`` images, times each attack's counts (:func:`attack_passes`).
    With AutoAttack an upper-bound-ish estimate: its later attacks are assumed to run on AA_ROBUST_FRACTION of
    the points (``robust``; APGD-CE on the ``clean`` fraction) for all their iterations. A run's ``--run``
    evaluates two checkpoints: twice this."""

    if n <= 0:
        return 0.0
    names = dict.fromkeys(["clean", *attacks])
    counts = [attack_passes(a, clean=clean, robust=robust) for a in names]
    device = torch.device(device)
    b = min(batch, n)
    with preserved_state(device):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # evaluate's default
        model = build(arch, num_classes).to(device)
        fwd, grad = _pass_seconds(model, b, device)
    return sum(p * grad + f * fwd for p, f in counts) * n / b


class FirstBatches:
    """Called by the training loop after each batch with the number done (``train_one_epoch(on_batch=...)``):
    skips WARMUP_BATCHES, times the next TIMED_BATCHES (fewer when the epoch is shorter), then calls
    ``report(seconds per batch)`` once. Two device syncs in all; the batches themselves are untouched."""

    def __init__(self, device, batches: int, report: Callable[[float], None]):
        self.device, self.report = torch.device(device), report
        self.last = max(1, min(batches, WARMUP_BATCHES + TIMED_BATCHES))
        self.first = WARMUP_BATCHES if self.last > WARMUP_BATCHES else 0  # a too short epoch: time it all
        self.t0 = time.perf_counter()
        self.done = False

    def __call__(self, n_batches: int) -> None:
        if self.done:
            return
        if n_batches == self.first:
            sync(self.device)
            self.t0 = time.perf_counter()
        if n_batches >= self.last:
            sync(self.device)
            self.done = True
            self.report((time.perf_counter() - self.t0) / (n_batches - self.first))


def self_trained_teacher_note(cfg, train_images: int, teacher_images: int, world_size: int = 1) -> Optional[str]:
    """The size of a run that first trains its own teacher (no --teacher), for the line ``train`` prints
    before it starts; None for any other run. ``train_images`` / ``teacher_images``: the student's and the
    teacher's training images (``Prepared.train``; ``cfg.teacher_run`` holds the teacher's settings)."""
    if cfg.teacher is None or cfg.teacher.get("source") != "trained" or cfg.teacher_run is None:
        return None
    t = cfg.teacher_run
    t_batches = batches_per_epoch(teacher_images, t["batch_size"], world_size)
    s_batches = batches_per_epoch(train_images, cfg.batch_size, world_size)
    return (
        f"no --teacher: this run first trains its own {t['student']} teacher with {t['method'].upper()}: "
        f"{count(t['epochs'], 'epoch')} x {count(t_batches, 'batch')} = {count(t['epochs'] * t_batches, 'batch')}, "
        f"then {count(cfg.epochs, 'epoch')} x {count(s_batches, 'batch')} of {cfg.method}"
    )


def long_cpu_run_note(device, batches: int) -> Optional[str]:
    """The line ``train`` prints before a CPU run of ``batches`` batches (its teacher's included) at least
    CPU_LONG_BATCHES long; None otherwise."""
    if torch.device(device).type != "cpu" or batches < CPU_LONG_BATCHES:
        return None
    return (
        f"{batches:,} batches on a CPU: the time estimate follows once the first batches are timed; "
        f"--preset quick trains a CPU-sized run ({QUICK_PRESET_CPU})"
    )
