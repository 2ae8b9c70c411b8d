"""Each fused op against the eager composite it replaces (rslad_fast.ops.reference) and against
torch.compile of that composite: forward, and forward + backward for softmax_kl.

Read the table by group: within a group the rows ran side by side in one run, so their ratio is the speed-up.
"""

import torch
from bench_utils import run_synced

from rslad_fast import ops
from rslad_fast.ops import reference

# Sizes: the CIFAR attack batch (128 images, 10 classes) everywhere; a larger one on CUDA.
PGD_SHAPES = {"cpu": [(128, 3, 32, 32)], "cuda": [(128, 3, 32, 32), (512, 3, 32, 32)]}
KL_SHAPES = {"cpu": [(128, 10), (512, 100)], "cuda": [(128, 10), (512, 10), (512, 1000)]}
IMPLS = ("fused", "eager", "compiled")

_compiled_cache = {}


def _compiled(fn):
    if fn not in _compiled_cache:
        _compiled_cache[fn] = torch.compile(fn, dynamic=False)
    return _compiled_cache[fn]


def _pgd_eager(x_adv, grad, x_nat, eps, alpha):
    return reference.pgd_step_(x_adv, grad, x_nat, eps, alpha)


def _pgd_composite(x_adv, grad, x_nat, eps, alpha):
    # Out of place so torch.compile sees a pure function; same math as the reference.
    stepped = x_adv + alpha * torch.sign(grad)
    return torch.clamp(torch.min(torch.max(stepped, x_nat - eps), x_nat + eps), 0.0, 1.0)


def _pgd_impl(impl):
    if impl == "fused":
        return ops.pgd_step_
    if impl == "eager":
        return _pgd_eager
    return _compiled(_pgd_composite)


def _kl_impl(impl):
    if impl == "fused":
        return ops.softmax_kl
    if impl == "eager":
        return reference.softmax_kl
    return _compiled(reference.softmax_kl)


def _params(shapes, device):
    return [(device, shape, impl) for shape in shapes[device] for impl in IMPLS]


def pytest_generate_tests(metafunc):
    if "pgd_case" in metafunc.fixturenames:
        cases = [c for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available() for c in _params(PGD_SHAPES, d)]
        metafunc.parametrize("pgd_case", cases, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}")
    if "kl_case" in metafunc.fixturenames:
        cases = [c for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available() for c in _params(KL_SHAPES, d)]
        metafunc.parametrize("kl_case", cases, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}")


def test_pgd_step(benchmark, provenance, pgd_case):
    device, shape, impl = pgd_case
    benchmark.group = f"pgd_step {device} {list(shape)}"
    provenance(device, op="pgd_step_", shape=list(shape), impl=impl)
    g = torch.Generator().manual_seed(0)
    x_nat = torch.rand(shape, generator=g).to(device)
    x_adv = x_nat.clone()
    grad = torch.randn(shape, generator=g).to(device)
    fn = _pgd_impl(impl)
    run_synced(benchmark, lambda: fn(x_adv, grad, x_nat, 8 / 255, 2 / 255), device)


def test_softmax_kl_forward(benchmark, provenance, kl_case):
    device, shape, impl = kl_case
    benchmark.group = f"softmax_kl forward {device} {list(shape)}"
    provenance(device, op="softmax_kl", pass_="forward", shape=list(shape), impl=impl)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    fn = _kl_impl(impl)
    run_synced(benchmark, lambda: fn(s, t, 1.0, "sum"), device)


def test_softmax_kl_forward_backward(benchmark, provenance, kl_case):
    device, shape, impl = kl_case
    benchmark.group = f"softmax_kl forward+backward {device} {list(shape)}"
    provenance(device, op="softmax_kl", pass_="forward+backward", shape=list(shape), impl=impl)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    t = torch.randn(shape, generator=g).to(device)
    fn = _kl_impl(impl)

    def step():
        (grad,) = torch.autograd.grad(fn(s, t, 1.0, "sum"), s)
        return grad

    run_synced(benchmark, step, device)
