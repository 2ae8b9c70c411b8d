"""(d) RSLAD training throughput, and (e) the ablation of what each optimization is worth.

Every row trains the same RSLAD step (T(x) once, PGD-10 on KL(T(x) || S(x')), 5/6 KL(S(x')) + 1/6 KL(S(x))
mean, SGD) on batches from a loader, for a fixed number of batches, and reports images/s and the epoch
time it implies for the 50,000-image training set. Rows of one group ran side by side in one run.

- "reference" is benchmarks/reference_rslad.py: the official code's eager fp32 loop with a DataLoader.
- the other rows go through rslad_fast.engine.step.train_step, the step the training engine runs.

Sizes: on CUDA, batch 128 with the WRN-34-10 teacher, 30 batches a round. On the CPU (2 cores here) the same
code runs at batch 8 for 1 batch with a ResNet-18 standing in for the WRN-34-10 teacher, whose forward
alone would take seconds per batch; the CPU rows show the code paths work and what they cost there.
"""
import dataclasses
import itertools

import pytest
import torch
from bench_utils import DEVICES, median_s, run_synced, save_result

import reference_rslad as ref
from rslad_fast.data import TensorLoader, dali_available
from rslad_fast.engine.step import train_step
from rslad_fast.methods import get
from rslad_fast.models import build

SIZES = {"cpu": dict(batch=8, batches=1, teacher="resnet18", rounds=2),
         "cuda": dict(batch=128, batches=30, teacher="wrn34-10", rounds=3)}
TRAIN_SET = 50000


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    reference: bool = True        # the official eager loop (reference_rslad.train_step)
    input_grad_only: bool = False  # reference loop with autograd.grad instead of backward() in the attack
    cuda_graph: bool = False
    bf16: bool = False
    channels_last: bool = False
    loader: str = "dataloader"     # "dataloader" | "torch" (GPU-resident TensorLoader) | "dali"
    needs_cuda: bool = False       # a row that only differs from the previous one on a GPU

# bf16 applies on CUDA only: a CPU without native bf16 (this one) runs bf16 convolutions ~10x slower than
# fp32 (measured: MobileNetV2 forward+backward at batch 8, 0.21 s fp32 vs 1.8 s bf16, channels_last).


# (e): one optimization added per row, in this order.
ABLATION = [
    Variant("reference"),
    Variant("+ no parameter gradients in the attack", input_grad_only=True),
    Variant("+ fused ops", reference=False),
    Variant("+ CUDA graph", reference=False, cuda_graph=True, needs_cuda=True),
    Variant("+ bf16", reference=False, cuda_graph=True, bf16=True, needs_cuda=True),
    Variant("+ channels_last", reference=False, cuda_graph=True, bf16=True, channels_last=True),
    Variant("+ GPU-resident loader", reference=False, cuda_graph=True, bf16=True, channels_last=True, loader="torch"),
    Variant("+ DALI loader", reference=False, cuda_graph=True, bf16=True, channels_last=True, loader="dali"),
]
# (d): the eager fp32 reference against ours in fp32 and in bf16 (all optimizations but precision).
THROUGHPUT = [
    Variant("reference"),
    Variant("ours fp32", reference=False, cuda_graph=True, channels_last=True, loader="torch"),
    Variant("ours bf16", reference=False, cuda_graph=True, bf16=True, channels_last=True, loader="torch",
            needs_cuda=True),
]


def _loader(variant, images, labels, batch, device):
    if variant.loader == "dataloader":
        return ref.make_dataloader(images, labels, batch, num_workers=2)
    if variant.loader == "torch":
        return TensorLoader(images, labels, batch, train=True, device=device, seed=0)
    from rslad_fast.data.dali import DaliLoader
    return DaliLoader(images, labels, batch, train=True, device=device, seed=0)


def _run(benchmark, provenance, device, student_arch, variant, group):
    size = SIZES[device]
    if variant.needs_cuda and device != "cuda":
        pytest.skip("CUDA graph / bf16 rows run on a GPU only (on the CPU this row equals the previous one)")
    if variant.loader == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    benchmark.group = group
    torch.manual_seed(0)
    student = build(student_arch).to(device)
    teacher = build(size["teacher"]).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    student, teacher = student.to(memory_format=memory_format), teacher.to(memory_format=memory_format)
    optimizer = ref.sgd(student)
    n = size["batch"] * size["batches"]
    images, labels = ref.random_cifar(n)
    loader = _loader(variant, images, labels, size["batch"], device)
    method = None if variant.reference else get("rslad")(cuda_graph=variant.cuda_graph and device == "cuda")
    amp = torch.bfloat16 if variant.bf16 and device == "cuda" else None

    def epoch():
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            if variant.reference:
                if variant.input_grad_only:
                    _reference_step_input_grad(student, teacher, optimizer, x)
                else:
                    ref.train_step(student, teacher, optimizer, x)
            else:
                train_step(student, method, optimizer, x, y, teacher=teacher, amp_dtype=amp)

    provenance(device, student=student_arch, teacher=size["teacher"], batch=size["batch"],
               batches=size["batches"], impl=variant.name, variant=dataclasses.asdict(variant))
    run_synced(benchmark, epoch, device, rounds=size["rounds"], warmup=1)
    median = median_s(benchmark)
    if median is None:
        return
    benchmark.extra_info.update(images_per_s=n / median, epoch_s_estimate=TRAIN_SET * median / n)
    save_result(f"{group}-{variant.name}".replace(" ", "_").replace("/", "_").replace("+", "plus"),
                {"device": device, "student": student_arch, "teacher": size["teacher"], "variant": variant.name,
                 "images_per_s": n / median, "epoch_s_estimate": TRAIN_SET * median / n})


def _reference_step_input_grad(student, teacher, optimizer, x):
    """The reference step with the official RSLAD code's autograd.grad attack (no parameter gradients)."""
    student.train()
    with torch.no_grad():
        t_logits = teacher(x)
    x_adv = ref.rslad_inner_loss(student, t_logits, x, input_grad_only=True)
    optimizer.zero_grad()
    kl = torch.nn.KLDivLoss(reduction="none")
    target = torch.softmax(t_logits, dim=1)
    loss = 5 / 6 * kl(torch.log_softmax(student(x_adv), 1), target).mean() + \
        1 / 6 * kl(torch.log_softmax(student(x), 1), target).mean()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("case", list(itertools.product(DEVICES, ("resnet18", "mnv2"), THROUGHPUT)),
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2].name}")
def test_training_throughput(benchmark, provenance, case):
    device, arch, variant = case
    _run(benchmark, provenance, device, arch, variant, f"RSLAD training {device} {arch} <- teacher")


@pytest.mark.parametrize("case", list(itertools.product(DEVICES, ("mnv2",), ABLATION)),
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2].name}")
def test_ablation(benchmark, provenance, case):
    device, arch, variant = case
    _run(benchmark, provenance, device, arch, variant, f"ablation {device} {arch}")
