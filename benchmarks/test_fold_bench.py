"""Folded BatchNorm (rslad_fast.models.fold, issue 20 lever 1) against the plain eval-mode model.

Groups (rows of one group ran side by side in one run; their ratio is the speed-up):
- the attack's unit of work, one eval-mode student forward + input gradient (what each of the 10 PGD steps
  runs), for MobileNetV2 and ResNet-18, contiguous and channels_last: plain, folded, and the per-optimizer-
  step cost of `FoldedCopy.refresh()` that the folded rows add once per 10 of them;
- the frozen WRN-34-10 teacher's forward (inference_mode): plain and folded.

Sizes: the official batch 128 for the students and batch 32 for the teacher, on the CPU (2 intra-op threads)
and on CUDA (plus batch 512 for the students). With timing off (`--benchmark-disable`, CI's smoke run) the
same rows run once at batch 2, so the smoke run stays a few seconds. The CPU model and its avx512_bf16 /
AMX flags are recorded with every row (extra_info, and the JSON of RSLAD_FAST_BENCH_OUT).
"""

import functools
import re

import pytest
import torch
from bench_utils import DEVICES, REDUCED, median_s, run_synced, save_result

from rslad_fast.models import build
from rslad_fast.models.fold import FoldedCopy, fold_bn

STUDENT_BATCHES = {"cpu": (128,), "cuda": (128, 512)}
TEACHER_BATCH = 32
SMOKE_BATCH = 2  # timing off: each row runs once, at this batch
CPU_THREADS = 2


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """The CPU's model name and its bf16-relevant flags (from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {"cpu_model": "unknown", "cpu_bf16_flags": []}
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wanted = [f for f in (flags.group(1).split() if flags else []) if f == "avx512_bf16" or f.startswith("amx")]
    return {"cpu_model": model.group(1).strip() if model else "unknown", "cpu_bf16_flags": sorted(set(wanted))}


@pytest.fixture
def threads(request):
    """CPU rows run with CPU_THREADS intra-op threads; the previous count is restored."""
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(saved)


@functools.lru_cache(maxsize=4)
def _models(arch, device, channels_last):
    """(plain eval-mode model, its FoldedCopy), built once per run and shared by the rows of a group."""
    torch.manual_seed(0)
    model = build(arch).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, FoldedCopy(model)  # the plain student keeps requires_grad, as in training


def _input(batch, device, channels_last):
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _student_cases():
    for device in DEVICES:
        for arch in ("mnv2", "resnet18"):
            for channels_last in (False, True):
                for batch in STUDENT_BATCHES[device]:
                    for impl in ("plain", "folded", "refresh"):
                        yield device, arch, channels_last, batch, impl


def _id(case):
    return "-".join("channels_last" if v is True else "contiguous" if v is False else str(v) for v in case)


def _provenance(provenance, device, **fields):
    provenance(device, threads=torch.get_num_threads(), **(cpu_info() if device == "cpu" else {}), **fields)


def _save(benchmark, name, payload):
    if median_s(benchmark) is None:
        return
    save_result(name, dict(payload, median_s=median_s(benchmark), threads=torch.get_num_threads(), **cpu_info()))


@pytest.mark.parametrize("case", list(_student_cases()), ids=_id)
def test_fold_student_forward_input_grad(benchmark, provenance, threads, case):
    device, arch, channels_last, batch, impl = case
    if benchmark.disabled:
        batch = SMOKE_BATCH
    layout = "channels_last" if channels_last else "contiguous"
    benchmark.group = f"eval forward + input grad {device} {arch} {layout} batch {batch}"
    _provenance(provenance, device, arch=arch, batch=batch, layout=layout, impl=impl)
    model, copy = _models(arch, device, channels_last)
    x = _input(batch, device, channels_last)
    w = torch.randn(batch, 10, generator=torch.Generator().manual_seed(1)).to(device)

    def forward_input_grad(m):
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((m(xg) * w).sum(), xg)
        return grad

    if impl == "refresh":
        fn = copy.refresh
    else:
        fn = functools.partial(forward_input_grad, copy.module if impl == "folded" else model)
    if benchmark.disabled:
        run_synced(benchmark, fn, device, rounds=1, warmup=0)
        return
    rounds = 5 if device == "cpu" else (10 if REDUCED else 30)
    run_synced(benchmark, fn, device, rounds=rounds, warmup=1 if device == "cpu" else 3)
    _save(
        benchmark,
        f"fold-student-{_id(case)}",
        {"device": device, "arch": arch, "batch": batch, "layout": layout, "impl": impl},
    )


def _teacher_cases():
    for device in DEVICES:
        for channels_last in (False, True):
            for impl in ("plain", "folded"):
                yield device, channels_last, impl


@functools.lru_cache(maxsize=2)
def _teacher(device, channels_last):
    """The real WRN-34-10 (random weights: timing only), frozen, and its folded copy."""
    torch.manual_seed(0)
    teacher = build("wrn34-10").to(device).eval()
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, fold_bn(teacher)


@pytest.mark.parametrize("case", list(_teacher_cases()), ids=_id)
def test_fold_teacher_forward(benchmark, provenance, threads, case):
    device, channels_last, impl = case
    batch = SMOKE_BATCH if benchmark.disabled else TEACHER_BATCH
    layout = "channels_last" if channels_last else "contiguous"
    benchmark.group = f"teacher forward {device} wrn34-10 {layout} batch {batch}"
    _provenance(provenance, device, arch="wrn34-10", batch=batch, layout=layout, impl=impl)
    teacher, folded = _teacher(device, channels_last)
    model = folded if impl == "folded" else teacher
    x = _input(batch, device, channels_last)

    def forward():
        with torch.inference_mode():
            return model(x)

    if benchmark.disabled:
        run_synced(benchmark, forward, device, rounds=1, warmup=0)
        return
    rounds = 3 if device == "cpu" else (10 if REDUCED else 30)
    run_synced(benchmark, forward, device, rounds=rounds, warmup=1 if device == "cpu" else 3)
    _save(
        benchmark,
        f"fold-teacher-{_id(case)}",
        {"device": device, "arch": "wrn34-10", "batch": batch, "layout": layout, "impl": impl},
    )
