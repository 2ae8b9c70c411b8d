"""Where one RSLAD training step spends its time: torch.profiler over one step of the official code
(benchmarks/reference_rslad.py) and one of ours (the engine's step with this machine's defaults, built as
`train` builds it), each after a warm-up step; prints the top operators by self time.

    python scripts/profile_step.py --student resnet18 [--batch 128] [--teacher wrn34-10] [--top 12]

For BENCHMARKS.md: the before (official) and after (ours) tables of where the time goes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import reference_rslad as ref  # noqa: E402

from rslad_fast.engine import RunSettings, resolve  # noqa: E402
from rslad_fast.engine.build import build_parts, memory_format, random_teacher, setup_device  # noqa: E402
from rslad_fast.engine.hardware import cpu_info  # noqa: E402
from rslad_fast.models import build  # noqa: E402


def official_step(student_arch: str, teacher_arch: str, batch: int):
    torch.manual_seed(0)
    student, teacher = build(student_arch), build(teacher_arch).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = ref.sgd(student)
    x = torch.rand(batch, 3, 32, 32)
    return lambda: ref.train_step(student, teacher, optimizer, x)


def our_step(student_arch: str, teacher_arch: str, batch: int, threads: int):
    cfg = resolve(
        RunSettings(
            method="rslad",
            student=student_arch,
            teacher="random-weights.pt",
            teacher_arch=teacher_arch,
            device="cpu",
            threads=threads,
            batch_size=batch,
        )
    )
    setup_device(cfg, torch.device("cpu"))
    p = build_parts(cfg, torch.device("cpu"), random_teacher(cfg), generator_seed=0)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=memory_format(cfg))
    y = torch.randint(0, 10, (batch,))

    def step():
        p.step(x, y)

    return step, cfg


def top(step, n: int) -> str:
    step()  # warm-up: allocator, oneDNN primitive caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--teacher", default="wrn34-10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    info = cpu_info()
    print(f"# {a.student} <- {a.teacher}, batch {a.batch}, {a.threads} threads, {info['model']} {info['flags']}")
    print(f"\n## official (fp32, NCHW)\n{top(official_step(a.student, a.teacher, a.batch), a.top)}")
    step, cfg = our_step(a.student, a.teacher, a.batch, a.threads)
    print(
        f"\n## ours (amp {cfg.amp}, channels_last {cfg.channels_last}, fold_bn {cfg.fold_bn}, teacher "
        f"{cfg.teacher_dtype}; uncached)\n{top(step, a.top)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
