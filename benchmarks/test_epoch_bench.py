"""(d) RSLAD training throughput, and (e) the ablation of what each optimization is worth.

Every row trains the same RSLAD step (T(x) once, PGD-10 on KL(T(x) || S(x')), 5/6 KL(S(x')) + 1/6 KL(S(x))
mean, SGD) on batches from a loader, for a fixed number of batches, and reports images/s and the epoch
time it implies for the 50,000-image training set. Rows of one group ran side by side in one run.

- "official" is benchmarks/reference_rslad.py: the official code's eager fp32 step, its attack gradient by
  `torch.autograd.grad` as `rslad_inner_loss` takes it, with a DataLoader. The headline ratios are against it.
- "official + torch.compile" is the same step with the student under `torch.compile` (inductor; on CUDA
  `mode="max-autotune"`, inductor's default in the reduced run): the speed a user gets without this project.
- "backward() loop" (ablation only) is the same step with the attack gradient by `loss.backward()`, as
  ARD's and TRADES-style loops and much user code take it.
- the "ours" rows go through rslad_fast.engine.step.train_step, the step the training engine runs.

Sizes: on CUDA, batch 128 with the WRN-34-10 teacher, 30 batches a round (RSLAD_FAST_BENCH_SIZE=reduced:
4 batches, 2 rounds). On the CPU (2 cores here) the same code runs at batch 32 for 1 batch with a ResNet-18
standing in for the WRN-34-10 teacher, whose forward alone takes seconds per batch; the CPU rows show
the code paths work and what they cost there. Compiling takes minutes on 2 cores: a run with timing off
(`--benchmark-disable`, CI's one-round smoke run) skips the compiled row and says so.

(f) the teacher-logit cache (`-k teacher_cache`): "ours fp32" uncached, then the same step with the cache at
the hit rates of a 300-epoch run (V = 162 views per image): 0% (the first epoch), 1 - (1 - 1/V)^150 = 60.5%
(epoch 150 of 300) and the 300-epoch average, mean over e = 0..299 of 1 - (1 - 1/V)^e = 54.4% (what the whole
run saves). Exactly that fraction (rounded) of the views the rounds draw is filled (a seeded choice; the
loader stays at one epoch, so every round draws the same views), and the mask is restored before every round,
so misses filled in one round do not raise the next round's hit rate; the restore (a copy of N x V bytes)
is inside the timed region. These rows use the WRN-34-10 teacher on the CPU too. (g) times the teacher stage
alone.
"""

import dataclasses
import itertools

import pytest
import reference_rslad as ref
import torch
from bench_utils import DEVICES, REDUCED, ROUNDS, median_s, run_synced, save_result

from rslad_fast.data import TensorLoader, dali_available, num_views
from rslad_fast.engine import RunSettings, resolve
from rslad_fast.engine.build import build_parts, random_teacher
from rslad_fast.engine.step import train_step
from rslad_fast.engine.teacher_cache import TeacherCache
from rslad_fast.models import build

SIZES = {
    "cpu": dict(batch=32, batches=1, teacher="resnet18", rounds=3),
    "cuda": dict(batch=128, batches=4 if REDUCED else 30, teacher="wrn34-10", rounds=2 if REDUCED else 3),
}
TRAIN_SET = 50000


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    impl: str = "official"  # "official" | "backward" (reference_rslad.train_step's attacks) | "ours"
    compiled: bool = False  # the student under torch.compile (official rows)
    cuda_graph: bool = False
    bf16: bool = False
    channels_last: bool = False
    loader: str = "dataloader"  # "dataloader" | "torch" (GPU-resident TensorLoader) | "dali"
    needs_cuda: bool = False  # a row that only differs from the previous one on a GPU
    cache_hit: float | None = None  # the teacher-logit cache with this fraction of its entries filled
    teacher: str | None = None  # the teacher architecture, where not the device's default (SIZES)


# bf16 applies on CUDA only: a CPU without native bf16 (this one) runs bf16 convolutions ~10x slower than
# fp32 (measured: MobileNetV2 forward+backward at batch 8, 0.21 s fp32 vs 1.8 s bf16, channels_last).


# (e): one optimization added per row, in this order.
ABLATION = [
    Variant("backward() loop", impl="backward"),
    Variant("official (autograd.grad attack)"),
    Variant("+ fused ops", impl="ours"),
    Variant("+ CUDA graph", impl="ours", cuda_graph=True, needs_cuda=True),
    Variant("+ bf16", impl="ours", cuda_graph=True, bf16=True, needs_cuda=True),
    Variant("+ channels_last", impl="ours", cuda_graph=True, bf16=True, channels_last=True),
    Variant("+ GPU-resident loader", impl="ours", cuda_graph=True, bf16=True, channels_last=True, loader="torch"),
    Variant("+ DALI loader", impl="ours", cuda_graph=True, bf16=True, channels_last=True, loader="dali"),
]
# (d): the official step, its compiled form, and ours in fp32 and in bf16 (all optimizations but precision).
THROUGHPUT = [
    Variant("official"),
    Variant("official + torch.compile", compiled=True),
    Variant("ours fp32", impl="ours", cuda_graph=True, channels_last=True, loader="torch"),
    Variant("ours bf16", impl="ours", cuda_graph=True, bf16=True, channels_last=True, loader="torch", needs_cuda=True),
]

VIEWS = num_views(4)


def hit_rate_after(epochs: int, views: int = VIEWS) -> float:
    """The expected teacher-cache hit rate of epoch `epochs` (from 0): the image's view was drawn before."""
    return 1 - (1 - 1 / views) ** epochs


RUN_EPOCHS = 300  # RSLAD's schedule
# (f): the cache at the first epoch's, epoch 150's and the 300-epoch run's average hit rate
# The real WRN-34-10 teacher on the CPU too (its forward: 2.25 s at batch 32 here, (g) below): what the cache
# saves is a share of the teacher's forward, which the ResNet-18 stand-in makes too small to resolve on the CPU.
_OURS = dict(impl="ours", cuda_graph=True, channels_last=True, loader="torch", teacher="wrn34-10")
TEACHER_CACHE = [
    Variant("ours fp32 uncached", **_OURS),
    Variant("cache 0% hits (epoch 1)", cache_hit=0.0, **_OURS),
    Variant(f"cache {100 * hit_rate_after(150):.1f}% hits (epoch 150 of 300)", cache_hit=hit_rate_after(150), **_OURS),
    Variant(
        f"cache {100 * sum(map(hit_rate_after, range(RUN_EPOCHS))) / RUN_EPOCHS:.1f}% hits (300-epoch mean)",
        cache_hit=sum(map(hit_rate_after, range(RUN_EPOCHS))) / RUN_EPOCHS,
        **_OURS,
    ),
]


def _loader(variant, images, labels, batch, device):
    if variant.loader == "dataloader":
        return ref.make_dataloader(images, labels, batch, num_workers=2)
    if variant.loader == "torch":
        return TensorLoader(
            images, labels, batch, train=True, device=device, seed=0, with_views=variant.cache_hit is not None
        )
    from rslad_fast.data.dali import DaliLoader

    return DaliLoader(images, labels, batch, train=True, device=device, seed=0)


def _run(benchmark, provenance, device, student_arch, variant, group):
    size = SIZES[device]
    if variant.needs_cuda and device != "cuda":
        pytest.skip("CUDA graph / bf16 rows run on a GPU only (on the CPU this row equals the previous one)")
    if variant.loader == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    if variant.compiled and benchmark.disabled:
        pytest.skip(
            "timing is off (--benchmark-disable): compiling the step takes minutes on a small CPU, "
            "and an untimed row measures nothing"
        )
    benchmark.group = group
    teacher_arch = variant.teacher or size["teacher"]
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    if variant.impl == "ours":  # built by the engine's own builder, as `train` builds a run with these settings
        cfg = resolve(
            RunSettings(
                method="rslad",
                student=student_arch,
                teacher="random-weights.pt",  # never read: random_teacher below
                teacher_arch=teacher_arch,
                device=device,
                threads=torch.get_num_threads(),
                batch_size=size["batch"],
                amp="bf16" if variant.bf16 and device == "cuda" else "fp32",
                channels_last=variant.channels_last,
                fold_bn=False,  # these rows predate folding: test_headline_bench.py adds it as its own lever
                teacher_dtype="fp32",
                hparams={"cuda_graph": variant.cuda_graph and device == "cuda"},
            )
        )
        torch.manual_seed(0)
        teacher = random_teacher(cfg)
        parts = build_parts(cfg, torch.device(device), teacher, generator_seed=0)
        student, teacher, optimizer, method = parts.student, parts.teacher, parts.optimizer, parts.method
    else:
        torch.manual_seed(0)
        student = build(student_arch).to(device)
        teacher = build(teacher_arch).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student, teacher = student.to(memory_format=memory_format), teacher.to(memory_format=memory_format)
        optimizer = ref.sgd(student)
        method = None
    model = student
    if variant.compiled:  # parameters shared with `student`: the optimizer steps the compiled model's weights
        # max-autotune on CUDA (minutes of autotuning), inductor's default on the CPU and in the reduced run
        model = torch.compile(student, mode="max-autotune" if device == "cuda" and not REDUCED else None)
    n = size["batch"] * size["batches"]
    images, labels = ref.random_cifar(n)
    loader = _loader(variant, images, labels, size["batch"], device)
    amp = torch.bfloat16 if variant.bf16 and device == "cuda" else None
    cache = prefill = None
    if variant.cache_hit is not None:
        cache = TeacherCache(n, loader.num_views, 10, device)
        g = torch.Generator(device=device).manual_seed(0)
        cache.table.normal_(generator=g)  # stand-in logits: the step's cost does not depend on their values
        # Exactly round(hit x n) of the views the rounds draw are filled: the loader stays at epoch 0, so
        # every round draws the same views (a per-entry random fill left both prefilled rows at 19/32 hits).
        drawn = torch.cat([batch[2] for batch in loader])
        k = round(variant.cache_hit * drawn.numel())
        prefill = torch.zeros_like(cache.filled)
        prefill[drawn[torch.randperm(drawn.numel(), generator=g, device=device)[:k]]] = True

    def epoch():
        if cache is not None:
            cache.filled.copy_(prefill)  # every round at the row's hit rate (see the module doc)
        for x, y, *views in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            if variant.impl == "ours":
                train_step(
                    student,
                    method,
                    optimizer,
                    x,
                    y,
                    teacher=teacher,
                    amp_dtype=amp,
                    cache=cache,
                    views=views[0] if views else None,
                )
            else:
                ref.train_step(
                    model, teacher, optimizer, x, attack="backward" if variant.impl == "backward" else "autograd.grad"
                )

    provenance(
        device,
        student=student_arch,
        teacher=teacher_arch,
        batch=size["batch"],
        batches=size["batches"],
        impl=variant.name,
        variant=dataclasses.asdict(variant),
    )
    hits_before = cache.stats() if cache is not None else None
    # The compiled row's warm-up epoch compiles (train and eval mode graphs) outside the timed rounds.
    run_synced(benchmark, epoch, device, rounds=ROUNDS or size["rounds"], warmup=1)
    extra = {}
    if cache is not None:  # the hit rate the timed rounds really had (warm-up included)
        hits, lookups = (now - then for now, then in zip(cache.stats(), hits_before))
        extra = dict(cache_hit_target=variant.cache_hit, cache_hit_measured=hits / max(lookups, 1))
        benchmark.extra_info.update(extra)
    median = median_s(benchmark)
    if median is None:
        return
    benchmark.extra_info.update(images_per_s=n / median, epoch_s_estimate=TRAIN_SET * median / n)
    save_result(
        f"{group}-{variant.name}".replace(" ", "_")
        .replace("/", "_")
        .replace("+", "plus")
        .replace("%", "pct")
        .replace("(", "")
        .replace(")", ""),
        {
            "device": device,
            "student": student_arch,
            "teacher": teacher_arch,
            "variant": variant.name,
            "images_per_s": n / median,
            "epoch_s_estimate": TRAIN_SET * median / n,
            **extra,
        },
    )


@pytest.mark.parametrize(
    "case",
    list(itertools.product(DEVICES, ("resnet18", "mnv2"), THROUGHPUT)),
    ids=lambda c: f"{c[0]}-{c[1]}-{c[2].name}",
)
def test_training_throughput(benchmark, provenance, case):
    device, arch, variant = case
    _run(benchmark, provenance, device, arch, variant, f"RSLAD training {device} {arch} <- teacher")


@pytest.mark.parametrize(
    "case", list(itertools.product(DEVICES, ("mnv2",), ABLATION)), ids=lambda c: f"{c[0]}-{c[1]}-{c[2].name}"
)
def test_ablation(benchmark, provenance, case):
    device, arch, variant = case
    _run(benchmark, provenance, device, arch, variant, f"ablation {device} {arch}")


@pytest.mark.parametrize(
    "case",
    list(itertools.product(DEVICES, ("mnv2", "resnet18"), TEACHER_CACHE)),
    ids=lambda c: f"{c[0]}-{c[1]}-{c[2].name}",
)
def test_teacher_cache(benchmark, provenance, case):
    device, arch, variant = case
    _run(benchmark, provenance, device, arch, variant, f"teacher cache {device} {arch} <- teacher")


# (g) What the cache changes, alone: T(x) of one training batch from the real WRN-34-10 teacher, uncached
# (its forward) and through the cache at each row's hit rate (exactly round(hit x batch) of the batch's views
# filled, reset every round). On the CPU the step rows above cannot resolve it: the stand-in teacher is a small
# share of a step whose rounds vary by ~10%. Batch 32 on the CPU (~400 GFLOP a forward), 128 on CUDA.
TEACHER_STAGE = {"cpu": dict(batch=32, rounds=5), "cuda": dict(batch=128, rounds=5 if REDUCED else 20)}


@pytest.mark.parametrize("case", list(itertools.product(DEVICES, TEACHER_CACHE)), ids=lambda c: f"{c[0]}-{c[1].name}")
def test_teacher_stage(benchmark, provenance, case):
    from rslad_fast.engine.step import teacher_logits

    device, variant = case
    size = TEACHER_STAGE[device]
    batch = size["batch"]
    benchmark.group = f"teacher stage {device} wrn34-10 batch {batch}"
    torch.manual_seed(0)
    teacher = build("wrn34-10").to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 3, 32, 32, device=device)
    views = torch.arange(batch, device=device) * VIEWS  # one view of each of `batch` images
    if variant.cache_hit is None:

        def stage():
            teacher_logits(teacher, x)

    else:
        cache = TeacherCache(batch, VIEWS, 10, device)
        cache.table.normal_(generator=torch.Generator(device=device).manual_seed(0))
        filled = torch.zeros_like(cache.filled)
        filled[views[: round(variant.cache_hit * batch)]] = True

        def stage():
            cache.filled.copy_(filled)
            cache.logits(teacher, x, views)

    hits = None if variant.cache_hit is None else round(variant.cache_hit * batch) / batch  # what the rounds had
    provenance(device, teacher="wrn34-10", batch=batch, impl=variant.name, cache_hit=hits)
    run_synced(benchmark, stage, device, rounds=ROUNDS or size["rounds"], warmup=1)
    median = median_s(benchmark)
    if median is not None:
        benchmark.extra_info.update(images_per_s=batch / median)
