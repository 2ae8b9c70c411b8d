"""(b) The 10-step RSLAD inner maximization: eager, then with the fused ops, then fused + CUDA graph.

Rows of one group ran side by side in one run. Sizes: batch 128 and 512 on CUDA; batch 16 on the CPU
(where one ResNet-18 attack step at batch 128 takes ~2 s).
"""

import pytest
import torch
from bench_utils import DEVICES, REDUCED, median_s, run_synced, save_result
from reference_rslad import rslad_inner_loss

import rslad_fast
from rslad_fast.models import build

BATCHES = {"cpu": (16,), "cuda": (128, 512)}
IMPLS = ("eager-backward", "eager", "fused", "fused+graph")


def _cases():
    for device in DEVICES:
        for arch in ("mnv2", "resnet18"):
            for batch in BATCHES[device]:
                for impl in IMPLS:
                    if impl == "fused+graph" and device != "cuda":
                        continue
                    yield device, arch, batch, impl


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: "-".join(map(str, c)))
def test_inner_loop(benchmark, provenance, case):
    device, arch, batch, impl = case
    benchmark.group = f"inner loop (10 steps) {device} {arch} batch {batch}"
    provenance(device, arch=arch, batch=batch, impl=impl, steps=10)
    torch.manual_seed(0)
    student = build(arch).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    t_logits = torch.randn(batch, 10, device=device)
    if impl == "eager-backward":
        fn = lambda: rslad_inner_loss(student, t_logits, x, input_grad_only=False)  # noqa: E731
    elif impl == "eager":  # the official rslad_inner_loss (autograd.grad)
        fn = lambda: rslad_inner_loss(student, t_logits, x)  # noqa: E731
    else:
        graph = impl == "fused+graph"
        fn = lambda: rslad_fast.fused_kl_pgd(student, x, t_logits, cuda_graph=graph)  # noqa: E731
    rounds = 3 if device == "cpu" else (5 if REDUCED else 20)
    run_synced(benchmark, fn, device, rounds=rounds, warmup=1 if device == "cpu" else 3)
    if median_s(benchmark) is None:
        return
    save_result(
        f"inner_loop-{'-'.join(map(str, case))}".replace("+", "_"),
        {"device": device, "arch": arch, "batch": batch, "impl": impl, "median_s": median_s(benchmark)},
    )
