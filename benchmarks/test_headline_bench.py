"""(h) The headline: one RSLAD training step at the official batch 128 with the real WRN-34-10 teacher
architecture (random weights: the cost does not depend on them), the official code's step against ours,
for both students, side by side in one run; and the ablation, one lever added per row.

- "official": benchmarks/reference_rslad.py as the official script runs it: fp32, NCHW, the teacher's
  forward under no_grad, `rslad_inner_loss`'s 10 eval-mode steps with `torch.autograd.grad`, the two
  train-mode forwards, SGD, and the next batch from a DataLoader with torchvision's transforms (2 workers),
  all inside the timed step.
- The "ours" rows are built by the engine itself (`engine.resolve` of a `RunSettings`, `engine.build`'s
  `build_parts`, `step.train_step`), so a row is what `train` would run with those settings; the batch comes
  from the engine's tensor loader (its crop/flip included in the timed step). Each row adds one lever to the
  row above it: the fused ops and tensor loader (fp32, NCHW), channels_last, folded BatchNorm (the teacher,
  and the student's eval-mode attack), bf16 autocast of the step (the student's passes and the teacher's forward
  with them), the teacher's weights in bf16 (`--teacher-dtype bf16`, its forward outside autocast), and the
  teacher-logit cache at the hit rate of a whole 300-epoch run (54.4%: every round fills exactly that share
  of the batch's views).
- "ours, defaults": `RunSettings` with nothing set, so the choices `resolve` makes for this student on this
  machine (engine/presets.py CPU_CHOICES: channels_last, bf16 where the CPU has native bf16), uncached and
  with the cache at 54.4%.

- AdaAD (`test_adaad_step`, issue 21): the teacher inside the attack (each of the 10 steps runs the teacher's
  forward and backward as well as the student's), the case where the teacher's cost weighs most. The official
  step (benchmarks/reference_adaad.py, boyellow/AdaAD's attack and loss) against ours in plain fp32 and with
  the defaults, both students (the reduced GPU check: ResNet-18 only).

Timing is per step (pytest-benchmark's median over the rounds, one warm-up step first); the ratios are
taken against the "official" row of the same group, in one run. `RSLAD_FAST_BENCH_ROUNDS` sets the rounds
(default 3). With timing off (`--benchmark-disable`, CI's smoke run) the rows run once at batch 8 with a
ResNet-8 in the teacher's place (the same code paths in seconds).
On CUDA the same rows run at batch 128 (`RSLAD_FAST_BENCH_SIZE=reduced`: 2 rounds).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Optional

import pytest
import reference_rslad as ref
import torch
from bench_utils import DEVICES, REDUCED, ROUNDS, median_s, run_synced, save_result

from rslad_fast.data import TensorLoader
from rslad_fast.engine import RunSettings, resolve
from rslad_fast.engine.build import build_parts, memory_format, random_teacher, setup_device
from rslad_fast.engine.hardware import cpu_info
from rslad_fast.engine.teacher_cache import TeacherCache

BATCH = 128  # the official batch size (rslad_train.py: batch_size=128)
MEAN_HIT = 0.544  # the cache's mean hit rate over RSLAD's 300 epochs: mean over e of 1 - (1 - 1/162)^e


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    official: bool = False
    given: tuple = ()  # RunSettings fields set (name, value); the rest as `resolve` chooses
    cache_hit: Optional[float] = None


PLAIN = (("channels_last", False), ("fold_bn", False), ("amp", "fp32"), ("teacher_dtype", "fp32"))


def _with(base: tuple, **changes) -> tuple:
    d = dict(base)
    d.update(changes)
    return tuple(d.items())


ROWS = [
    Row("official", official=True),
    Row("ours: fused ops, tensor loader (fp32, NCHW)", given=PLAIN),
    Row("+ channels_last", given=_with(PLAIN, channels_last=True)),
    Row("+ folded BatchNorm", given=_with(PLAIN, channels_last=True, fold_bn=True)),
    # --amp bf16 autocasts the step's passes: the student's and the teacher's forward (step.teacher_logits)
    Row("+ bf16 autocast (student and teacher)", given=_with(PLAIN, channels_last=True, fold_bn=True, amp="bf16")),
    Row(
        "+ bf16 teacher weights",
        given=_with(PLAIN, channels_last=True, fold_bn=True, amp="bf16", teacher_dtype="bf16"),
    ),
    Row(
        "+ teacher cache (54.4% hits)",
        given=_with(PLAIN, channels_last=True, fold_bn=True, amp="bf16", teacher_dtype="bf16"),
        cache_hit=MEAN_HIT,
    ),
    Row("ours, defaults"),
    Row("ours, defaults + teacher cache (54.4% hits)", cache_hit=MEAN_HIT),
]


def _official(device: str, student_arch: str, batch: int, steps: int, teacher_arch: str):
    torch.manual_seed(0)
    from rslad_fast.models import build

    student = build(student_arch).to(device)
    teacher = build(teacher_arch).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = ref.sgd(student)
    images, labels = ref.random_cifar(batch * steps)
    batches = iter(ref.make_dataloader(images, labels, batch, num_workers=2))

    def step():
        x, _ = next(batches)
        ref.train_step(student, teacher, optimizer, x.to(device, non_blocking=True))

    return step, {"amp": "fp32", "channels_last": False, "fold_bn": False, "teacher_dtype": "fp32"}


def _ours(device: str, student_arch: str, batch: int, steps: int, teacher_arch: str, row: Row, method="rslad"):
    settings = RunSettings(
        method=method,
        student=student_arch,
        teacher="random-weights.pt",  # never read: the teacher is built with random weights below
        teacher_arch=teacher_arch,
        device=device,
        threads=torch.get_num_threads(),
        batch_size=batch,
    )
    cfg = resolve(settings.replace(**dict(row.given)))
    dev = torch.device(device)
    setup_device(cfg, dev)
    parts = build_parts(cfg, dev, random_teacher(cfg), generator_seed=0)
    images, labels = ref.random_cifar(batch * steps)
    cached = row.cache_hit is not None
    loader = TensorLoader(images, labels, batch, train=True, device=dev, seed=0, with_views=cached)
    batches = iter(loader)
    cache = TeacherCache(len(labels), loader.num_views, cfg.num_classes, dev) if cached else None
    if cache is not None:
        cache.table.normal_(generator=torch.Generator(device=dev).manual_seed(0))  # stand-in logits
    fmt = memory_format(cfg)

    def step():
        x, y, *views = next(batches)
        if cache is not None:  # exactly round(hit x batch) of this batch's views filled
            cache.filled.zero_()
            cache.filled[views[0][: round(row.cache_hit * len(views[0]))]] = True
        parts.step(x.contiguous(memory_format=fmt), y, cache=cache, views=views[0] if views else None)

    chose = {k: getattr(cfg, k) for k in ("amp", "channels_last", "fold_bn")}
    return step, {**chose, "teacher_dtype": cfg.teacher_dtype}


@pytest.mark.parametrize(
    "case",
    list(itertools.product(DEVICES, ("mnv2", "resnet18"), ROWS)),
    ids=lambda c: f"{c[0]}-{c[1]}-{c[2].name}",
)
def test_headline_step(benchmark, provenance, case):
    device, arch, row = case
    batch, teacher = (8, "resnet8") if benchmark.disabled else (BATCH, "wrn34-10")
    rounds = ROUNDS or (2 if REDUCED else 3)
    steps = rounds + 1  # one warm-up step
    benchmark.group = f"RSLAD step {device} {arch} <- {teacher}, batch {batch}"
    if row.official:
        step, chose = _official(device, arch, batch, steps, teacher)
    else:
        step, chose = _ours(device, arch, batch, steps, teacher, row)
    info = cpu_info()
    provenance(
        device,
        student=arch,
        teacher=teacher,
        batch=batch,
        impl=row.name,
        cpu_model=info["model"],
        cpu_bf16_flags=info["flags"],
        threads=torch.get_num_threads(),
        cache_hit=row.cache_hit,
        **chose,
    )
    run_synced(benchmark, step, device, rounds=1 if benchmark.disabled else rounds, warmup=1)
    median = median_s(benchmark)
    if median is not None:
        benchmark.extra_info.update(images_per_s=batch / median)
        save_result(
            f"headline-{device}-{arch}-{row.name}".replace(" ", "_").replace("%", "pct").replace(":", ""),
            {"device": device, "student": arch, "row": row.name, "step_s": median, **chose},
        )


# AdaAD (issue 21): the teacher inside the attack, so each of the 10 steps runs the WRN-34-10 forward and
# backward too, the case where the teacher's cost dominates. The official step (reference_adaad.py) against
# ours, plain fp32 and with the defaults `resolve` chooses; no cache row (AdaAD's T(x') is never cached).
# The reduced GPU check times the ResNet-18 student only (its budget; scripts/gpu_check.sh EST[bench_headline]).
ADAAD_ROWS = [
    Row("official", official=True),
    Row("ours: fused ops, tensor loader (fp32, NCHW)", given=PLAIN),
    Row("ours, defaults"),
]


def _official_adaad(device: str, student_arch: str, batch: int, steps: int, teacher_arch: str):
    import reference_adaad as ref_adaad

    from rslad_fast.models import build

    torch.manual_seed(0)
    student = build(student_arch).to(device)
    teacher = build(teacher_arch).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = ref_adaad.sgd(student)
    images, labels = ref.random_cifar(batch * steps)
    batches = iter(ref.make_dataloader(images, labels, batch, num_workers=2))

    def step():
        x, _ = next(batches)
        ref_adaad.train_step(student, teacher, optimizer, x.to(device, non_blocking=True))

    return step, {"amp": "fp32", "channels_last": False, "fold_bn": False, "teacher_dtype": "fp32"}


# On the CPU the AdaAD rows run at batch 16: each step runs the WRN-34-10 forward and backward 10 times, and
# its forward alone took 2.65 s per 16 images in fp32 at 1 thread on this project's CPU (presets.CPU_CHOICES), so a
# batch-128 step would take many minutes; RSLAD_FAST_BENCH_ADAAD_CPU_BATCH=128 gives the official size.
ADAAD_CPU_BATCH = int(os.environ.get("RSLAD_FAST_BENCH_ADAAD_CPU_BATCH", "16"))


@pytest.mark.parametrize(
    "case",
    list(itertools.product(DEVICES, ("resnet18",) if REDUCED else ("mnv2", "resnet18"), ADAAD_ROWS)),
    ids=lambda c: f"{c[0]}-{c[1]}-adaad-{c[2].name}",
)
def test_adaad_step(benchmark, provenance, case):
    device, arch, row = case
    batch, teacher = (8, "resnet8") if benchmark.disabled else (BATCH, "wrn34-10")
    if device == "cpu" and not benchmark.disabled:
        batch = ADAAD_CPU_BATCH
    rounds = ROUNDS or (2 if REDUCED else 3)
    steps = rounds + 1  # one warm-up step
    benchmark.group = f"AdaAD step {device} {arch} <- {teacher}, batch {batch}"
    if row.official:
        step, chose = _official_adaad(device, arch, batch, steps, teacher)
    else:
        step, chose = _ours(device, arch, batch, steps, teacher, row, method="adaad")
    provenance(device, student=arch, teacher=teacher, batch=batch, impl=row.name, method="adaad", **chose)
    run_synced(benchmark, step, device, rounds=1 if benchmark.disabled else rounds, warmup=1)
    median = median_s(benchmark)
    if median is not None:
        benchmark.extra_info.update(images_per_s=batch / median)
        save_result(
            f"headline-adaad-{device}-{arch}-{row.name}".replace(" ", "_").replace(":", ""),
            {"device": device, "student": arch, "method": "adaad", "row": row.name, "step_s": median, **chose},
        )
