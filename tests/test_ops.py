"""The fused ops against their pure-PyTorch reference, their gradients, their registration and bad input.

These run against the compiled kernels: a missing build fails `test_compiled_ops_are_in_use` instead of
quietly testing the fallback. A test with a `device` parameter runs on the CPU and, marked `cuda`, on a GPU;
its inputs come from op_samples.py.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from op_samples import (
    DTYPES_CPU,
    DTYPES_CUDA,
    IMAGE_SHAPES,
    KL_BATCHES,
    KL_CLASSES,
    TOL,
    kl_sample,
    kl_specs,
    make_logits,
    make_pgd_inputs,
    pgd_sample,
    pgd_specs,
    spec_id,
)

from rslad_fast import ops
from rslad_fast.ops import reference

REDUCTIONS = ("none", "sum", "batchmean", "mean")
TEMPERATURES = (1.0, 4.0, 30.0)
compiled = pytest.mark.skipif(ops.backend() != "compiled", reason="the compiled op library is not built")
ON_CUDA = (pytest.mark.cuda, compiled)  # conftest.py skips `cuda` tests where no GPU is visible
DEVICES = ("cpu", pytest.param("cuda", marks=ON_CUDA))


def per_device(cpu_cases, cuda_cases):
    """(device, *case) parameters where the two devices sweep different cases."""
    return [("cpu", *c) for c in cpu_cases] + [pytest.param("cuda", *c, marks=ON_CUDA) for c in cuda_cases]


def _skip_without_kernel(device, dtype):
    if device == "cuda" and dtype not in DTYPES_CUDA:
        pytest.skip("no CUDA kernel for this dtype")


def test_compiled_ops_are_in_use():
    if os.environ.get("RSLAD_FAST_TEST_REFERENCE") == "1":
        pytest.skip("RSLAD_FAST_TEST_REFERENCE=1: testing the reference fallback on purpose")
    assert ops.backend() == "compiled", "rslad_fast._C did not load: build it with pip install -e ."


def _assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    # float16 flushes gradients below its smallest subnormal (6e-8) to 0: never ask for more than that.
    floor = 2.0**-23 if dtype == torch.float16 else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=max(atol * scale, floor), rtol=rtol)


# ---------------------------------------------------------------- pgd_step_


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=str)
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
@pytest.mark.parametrize("non_contiguous", (False, True), ids=("contiguous", "strided"))
def test_pgd_step_matches_reference_exactly(device, dtype, shape, non_contiguous):
    _skip_without_kernel(device, dtype)
    x_adv, grad, x_nat = make_pgd_inputs(shape, dtype, device, non_contiguous=non_contiguous)
    expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, 8 / 255, 2 / 255)
    out = ops.pgd_step_(x_adv, grad, x_nat, 8 / 255, 2 / 255)
    assert out is x_adv, "pgd_step_ must return its first argument, updated in place"
    # Both compute in the accumulation type and round once, so the results agree bit for bit.
    assert torch.equal(x_adv, expected)


def test_pgd_step_semantics():
    x_nat = torch.tensor([0.5, 0.5, 0.5, 0.99, 0.01, 0.5])
    x_adv = torch.tensor([0.5, 0.53, 0.47, 0.99, 0.01, 0.5])
    grad = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, 0.0])
    ops.pgd_step_(x_adv, grad, x_nat, eps=0.04, alpha=0.02, lo=0.0, hi=1.0)
    expected = torch.tensor([0.52, 0.54, 0.46, 1.0, 0.0, 0.5])  # step, project, project, clamp hi, clamp lo, sign 0
    torch.testing.assert_close(x_adv, expected)


def test_pgd_step_channels_last_and_aliasing():
    x_adv, grad, x_nat = make_pgd_inputs((4, 3, 8, 8), torch.float32)
    expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, 0.03, 0.01)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_nat)]
    ops.pgd_step_(*cl, 0.03, 0.01)
    assert cl[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl[0], expected)
    # Mixed layouts still give the right answer.
    x2 = x_adv.clone()
    ops.pgd_step_(x2, cl[1], x_nat, 0.03, 0.01)
    assert torch.equal(x2, expected)


def test_pgd_step_eps_zero_returns_natural_image():
    x_adv, grad, x_nat = make_pgd_inputs((2, 3, 4, 4), torch.float32)
    ops.pgd_step_(x_adv, grad, x_nat, 0.0, 0.1)
    assert torch.equal(x_adv, x_nat.clamp(0, 1))


def test_pgd_step_empty():
    x = torch.empty(0, 3, 32, 32)
    assert ops.pgd_step_(x, torch.empty_like(x), torch.empty_like(x), 0.1, 0.1).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("fn", (ops.pgd_step_, reference.pgd_step_), ids=("op", "reference"))
def test_pgd_step_bumps_version_counter(fn):
    """Autograd must see the in-place write: a backward that reads the old values fails loudly."""
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    y = x.exp()  # exp saves its output for the backward
    _, grad, x_nat = make_pgd_inputs((2, 3, 4, 4), torch.float32)
    before = y._version
    fn(y.detach(), grad, x_nat, 0.03, 0.01)  # a detached alias shares the version counter
    assert y._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@compiled
def test_pgd_step_raw_op_bumps_version_counter():
    x_adv, grad, x_nat = make_pgd_inputs((2, 3, 4, 4), torch.float32)
    before = x_adv._version
    torch.ops.rslad_fast.pgd_step_(x_adv, grad, x_nat, 0.03, 0.01, 0.0, 1.0)
    assert x_adv._version > before


@compiled
def test_pgd_step_under_torch_compile():
    x_adv, grad, x_nat = make_pgd_inputs((4, 3, 8, 8), torch.float32)
    expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, 8 / 255, 2 / 255)
    fn = torch.compile(lambda x, g, n: ops.pgd_step_(x, g, n, 8 / 255, 2 / 255), backend="aot_eager", fullgraph=True)
    fn(x_adv, grad, x_nat)
    assert torch.equal(x_adv, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=str)
def test_pgd_step_nan_matches_reference(device, dtype):
    """NaN in x_nat or x_adv gives NaN, as torch.clamp/min/max propagate it; a NaN gradient steps by
    sign(NaN) == 0, as torch.sign does."""
    _skip_without_kernel(device, dtype)
    x_adv, grad, x_nat = make_pgd_inputs((4, 3, 8, 8), dtype, device)
    x_nat.view(-1)[::7] = float("nan")
    x_adv.view(-1)[3::11] = float("nan")
    grad.view(-1)[5::13] = float("nan")
    nan_in = x_nat.isnan() | x_adv.isnan()
    expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, 8 / 255, 2 / 255)
    ops.pgd_step_(x_adv, grad, x_nat, 8 / 255, 2 / 255)
    assert torch.equal(x_adv.isnan(), nan_in)
    torch.testing.assert_close(x_adv, expected, atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------- softmax_kl forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=str)
@pytest.mark.parametrize("rows,classes", list(itertools.product(KL_BATCHES, KL_CLASSES)), ids=str)
@pytest.mark.parametrize("non_contiguous", (False, True), ids=("contiguous", "strided"))
def test_softmax_kl_matches_reference(device, dtype, rows, classes, non_contiguous):
    _skip_without_kernel(device, dtype)
    s = make_logits(rows, classes, dtype, device, seed=1, non_contiguous=non_contiguous)
    t = make_logits(rows, classes, dtype, device, seed=2, non_contiguous=non_contiguous)
    for reduction, temperature in itertools.product(REDUCTIONS, TEMPERATURES):
        out = ops.softmax_kl(s, t, temperature, reduction)
        expected = reference.softmax_kl(s.double(), t.double(), temperature, reduction)
        assert out.dtype == dtype and out.shape == expected.shape
        _assert_close(out, expected, dtype)


def test_softmax_kl_matches_torch_kl_div():
    """The op is the official RSLAD code's KLDivLoss(log_softmax(S), softmax(T)) (no temperature)."""
    s, t = make_logits(16, 10, torch.float64, seed=3), make_logits(16, 10, torch.float64, seed=4)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.softmax(t, 1), reduction="none")
    torch.testing.assert_close(ops.softmax_kl(s, t, reduction="none"), kl.sum(1))
    torch.testing.assert_close(ops.softmax_kl(s, t, reduction="mean"), kl.mean())
    torch.testing.assert_close(ops.softmax_kl(s, t, reduction="batchmean"), kl.sum() / 16)
    torch.testing.assert_close(ops.softmax_kl(s, t, reduction="sum"), kl.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_softmax_kl_huge_logits_stay_finite(device, dtype):
    _skip_without_kernel(device, dtype)
    s = make_logits(64, 10, torch.float64, device, scale=1e4, seed=5).to(dtype)
    t = make_logits(64, 10, torch.float64, device, scale=1e4, seed=6).to(dtype).requires_grad_(True)
    s.requires_grad_(True)
    for reduction in REDUCTIONS:
        out = ops.softmax_kl(s, t, 1.0, reduction)
        assert torch.isfinite(out).all()
        grads = torch.autograd.grad(out.sum(), (s, t))
        assert all(torch.isfinite(g).all() for g in grads)
        expected = reference.softmax_kl(s.detach().double(), t.detach().double(), 1.0, reduction)
        # Values reach ~1e4: compare relative to that magnitude.
        torch.testing.assert_close(out.detach().double(), expected, atol=1e4 * TOL[dtype][1], rtol=TOL[dtype][1])


def test_softmax_kl_zero_teacher_probability_contributes_zero():
    t = torch.tensor([[0.0, -1e4, -1e4], [3.0, 3.0, -1e4]], dtype=torch.float64)
    s = torch.tensor([[0.0, 5.0, -5.0], [1.0, 2.0, 50.0]], dtype=torch.float64)
    p, log_q = torch.softmax(t, 1), torch.log_softmax(s, 1)
    assert (p == 0).sum() == 3  # the -1e4 classes underflow to probability 0
    # The sum over only the classes the teacher gives mass to.
    expected = torch.stack([(p[i][p[i] > 0] * (p[i][p[i] > 0].log() - log_q[i][p[i] > 0])).sum() for i in range(2)])
    torch.testing.assert_close(ops.softmax_kl(s, t, reduction="none"), expected)


def test_softmax_kl_identical_inputs_is_zero():
    s = make_logits(9, 10, torch.float32)
    assert torch.all(ops.softmax_kl(s, s.clone(), reduction="none") == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_kl_empty_batch(device, reduction):
    s = torch.empty(0, 10, device=device, requires_grad=True)
    t = torch.empty(0, 10, device=device)
    out = ops.softmax_kl(s, t, 1.0, reduction)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.shape == () and out.item() == 0.0
    (g,) = torch.autograd.grad(out.sum(), s)
    assert g.shape == (0, 10)


# ---------------------------------------------------------------- softmax_kl backward


# The CUDA kernels choose their launch shape by rows and classes: there every shape of the forward sweep.
@pytest.mark.parametrize(
    "device,rows,classes",
    per_device([(1, 2), (7, 10), (128, 10), (513, 100), (5, 1000)], itertools.product(KL_BATCHES, KL_CLASSES)),
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES_CPU, ids=str)
@pytest.mark.parametrize("non_contiguous", (False, True), ids=("contiguous", "strided"))
def test_softmax_kl_backward_matches_reference(device, rows, classes, dtype, non_contiguous):
    _skip_without_kernel(device, dtype)
    s0 = make_logits(rows, classes, dtype, device, seed=7, non_contiguous=non_contiguous)
    t0 = make_logits(rows, classes, dtype, device, seed=8, non_contiguous=non_contiguous)
    for reduction, temperature in itertools.product(REDUCTIONS, TEMPERATURES):
        grads = []
        # The oracle runs in float64 on the same (rounded) inputs.
        for fn, dt in ((ops.softmax_kl, dtype), (reference.softmax_kl, torch.float64)):
            s, t = s0.to(dt).requires_grad_(True), t0.to(dt).requires_grad_(True)
            out = fn(s, t, temperature, reduction)
            g = (
                torch.linspace(-1.5, 2.0, rows, dtype=dt, device=device)
                if reduction == "none"
                else torch.tensor(0.7, dtype=dt, device=device)
            )
            grads.append(torch.autograd.grad(out, (s, t), g))
        (gs, gt), (rs, rt) = grads
        # Gradients are scaled down by the reduction; tolerances follow the largest reference entry.
        scale = max(rs.abs().max().item(), rt.abs().max().item(), 1e-12)
        _assert_close(gs, rs, dtype, scale)
        _assert_close(gt, rt, dtype, scale)


def test_softmax_kl_only_student_grad():
    s = make_logits(4, 10, torch.float32).requires_grad_(True)
    t = make_logits(4, 10, torch.float32, seed=3)
    ops.softmax_kl(s, t, reduction="sum").backward()
    expected = torch.softmax(s.detach(), 1) - torch.softmax(t, 1)
    torch.testing.assert_close(s.grad, expected)


# On CUDA, float64 reductions run the 1024-thread kernel whose register use once exceeded a block's on sm_90.
@pytest.mark.parametrize(
    "device,rows,classes,temperature", per_device([(5, 7, 1.0), (5, 7, 3.0)], [(33, 31, 2.0)]), ids=str
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_kl_gradcheck_and_opcheck(device, rows, classes, temperature, reduction):
    s = make_logits(rows, classes, torch.float64, device, seed=9).requires_grad_(True)
    t = make_logits(rows, classes, torch.float64, device, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.softmax_kl(a, b, temperature, reduction), (s, t))
    torch.library.opcheck(
        torch.ops.rslad_fast.softmax_kl.default, (s, t), {"temperature": temperature, "reduction": reduction}
    )


# ---------------------------------------------------------------- softmax_kl on non-finite logits

# Class counts that take each path of the CPU kernels: a padded short row, whole vectors plus an
# overlapping tail, and several vectors (and several lanes of the float64 and CUDA states).
NONFINITE_CLASSES = (3, 10, 37)


def _grad_output(s, reduction):
    if reduction == "none":
        return torch.linspace(-1.5, 2.0, s.shape[0], dtype=s.dtype, device=s.device)
    return torch.tensor(0.7, dtype=s.dtype, device=s.device)


def _kl_oracle(s, t, temperature, reduction):
    """KL(p || q) in float64 from its definition over the classes the teacher gives mass to, with
    autograd gradients: a teacher logit of -inf (probability 0) drops out of the sum and gets gradient 0."""
    g = _grad_output(s, reduction).cpu().double()
    s = s.detach().double().requires_grad_(True)
    t = t.detach().double().requires_grad_(True)
    rows = []
    for i in range(s.shape[0]):
        live = torch.isfinite(t[i])
        log_p = torch.log_softmax(t[i][live] / temperature, 0)
        log_q = torch.log_softmax(s[i] / temperature, 0)[live]
        rows.append((log_p.exp() * (log_p - log_q)).sum())
    per_row = torch.stack(rows)
    out = {
        "none": per_row,
        "sum": per_row.sum(),
        "batchmean": per_row.sum() / s.shape[0],
        "mean": per_row.sum() / s.numel(),
    }[reduction]
    return (out.detach(), *torch.autograd.grad(out, (s, t), g))


def _kl_with_grads(fn, s, t, temperature, reduction):
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = fn(s, t, temperature, reduction)
    return (out.detach(), *torch.autograd.grad(out, (s, t), _grad_output(s, reduction)))


NONFINITE_FNS = (pytest.param(ops.softmax_kl, id="op"), pytest.param(reference.softmax_kl, id="reference"))


def _dtypes_for(device):
    return DTYPES_CUDA if device == "cuda" else DTYPES_CPU


@pytest.mark.parametrize("fn", NONFINITE_FNS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", NONFINITE_CLASSES)
@pytest.mark.parametrize("side", ("student", "teacher"))
def test_softmax_kl_nan_in_gives_nan_out(fn, device, classes, side):
    """A NaN logit makes its row's KL and both of its rows' gradients NaN, and any reduced loss NaN; the
    other rows are untouched."""
    for dtype, reduction in itertools.product(_dtypes_for(device), REDUCTIONS):
        s, t = make_logits(4, classes, dtype, device, seed=1), make_logits(4, classes, dtype, device, seed=2)
        bad = s if side == "student" else t
        bad[1, 0] = float("nan")  # the first class: the first element of a lane
        bad[2, -1] = float("nan")  # the last class: the tail of a vectorized row
        out, gs, gt = _kl_with_grads(fn, s, t, 2.0, reduction)
        _, rs, rt = _kl_oracle(s.cpu(), t.cpu(), 2.0, reduction)
        if reduction == "none":
            assert out[1:3].isnan().all() and not out[[0, 3]].isnan().any(), (dtype, out)
        else:
            assert out.isnan(), (dtype, reduction, out)
        for g, r in ((gs, rs), (gt, rt)):
            assert g[1:3].isnan().all(), (dtype, reduction, g)
            _assert_close(g[[0, 3]].cpu(), r[[0, 3]], dtype, max(r[[0, 3]].abs().max().item(), 1e-12))


def _minus_inf_teacher(classes, dtype, device):
    """Teacher rows with classes of probability 0 (logit -inf) at the positions the kernels treat apart:
    the first class, many classes, the last class, all but one class, and none."""
    s, t = make_logits(5, classes, dtype, device, seed=3), make_logits(5, classes, dtype, device, seed=4)
    t[0, 0] = -float("inf")
    t[1, : classes // 2 + 1] = -float("inf")
    s[1, 0] = -float("inf")  # q = 0 where p = 0 too: the class still contributes 0
    t[2, -1] = -float("inf")
    t[3, 1:] = -float("inf")  # p is one-hot: KL = -log q_0
    return s, t


@pytest.mark.parametrize("fn", NONFINITE_FNS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", NONFINITE_CLASSES)
def test_softmax_kl_minus_inf_teacher_logits(fn, device, classes):
    """A teacher logit of -inf is a class of probability 0: it contributes 0 to the KL and gets gradient
    0, and the rest of its row gets the KL and gradients of the classes that remain."""
    for dtype, reduction, temperature in itertools.product(_dtypes_for(device), REDUCTIONS, (1.0, 4.0)):
        s, t = _minus_inf_teacher(classes, dtype, device)
        out, gs, gt = _kl_with_grads(fn, s, t, temperature, reduction)
        expected, rs, rt = _kl_oracle(s.cpu(), t.cpu(), temperature, reduction)
        _assert_close(out.cpu(), expected, dtype)
        scale = max(rs.abs().max().item(), rt.abs().max().item(), 1e-12)
        _assert_close(gs.cpu(), rs, dtype, scale)
        _assert_close(gt.cpu(), rt, dtype, scale)
        assert torch.all(gt[torch.isinf(t)] == 0)


def test_softmax_kl_minus_inf_teacher_matches_kl_div():
    """The official RSLAD code's KLDivLoss(log_softmax(S), softmax(T)), whose target 0 contributes 0."""
    s, t = _minus_inf_teacher(10, torch.float64, "cpu")
    s[1, 0] = 0.0  # kl_div's 0 * log q is NaN where log q is -inf: finite student logits only
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.softmax(t, 1), reduction="none")
    assert torch.isfinite(kl.sum(1)).all()
    for fn in (ops.softmax_kl, reference.softmax_kl):
        torch.testing.assert_close(fn(s, t, reduction="none"), kl.sum(1))
        torch.testing.assert_close(fn(s, t, reduction="mean"), kl.mean())
    # The one-hot row: KL = -log q_0.
    torch.testing.assert_close(ops.softmax_kl(s[3:4], t[3:4], reduction="sum"), -torch.log_softmax(s[3], 0)[0])


@pytest.mark.parametrize("fn", NONFINITE_FNS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", NONFINITE_CLASSES)
def test_softmax_kl_minus_inf_student_logit(fn, device, classes):
    """q_c = 0 where p_c > 0 makes KL(p || q) infinite."""
    for dtype, reduction in itertools.product(_dtypes_for(device), REDUCTIONS):
        s, t = make_logits(3, classes, dtype, device, seed=5), make_logits(3, classes, dtype, device, seed=6)
        s[1, -1] = -float("inf")
        out = fn(s, t, 1.0, reduction)
        if reduction == "none":
            assert out[1] == float("inf") and torch.isfinite(out[[0, 2]]).all(), (dtype, out)
        else:
            assert out == float("inf"), (dtype, reduction, out)


@compiled
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default", reason="already the baseline run")
def test_nonfinite_on_the_baseline_cpu_kernels():
    """The same non-finite checks with ATEN_CPU_CAPABILITY=default, which selects the kernels compiled for
    the baseline ISA instead of the AVX2 ones."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    capability = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    assert capability == "DEFAULT"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not cuda",
        "-k",
        "(nan_in_gives_nan_out or minus_inf_) and not reference",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


# ---------------------------------------------------------------- registration (opcheck)


@compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", kl_specs((torch.float32, torch.float64)), ids=spec_id)
def test_opcheck_softmax_kl(device, spec):
    args, kwargs = kl_sample(spec, device, requires_grad=True)
    torch.library.opcheck(torch.ops.rslad_fast.softmax_kl.default, args, kwargs)


@compiled
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_softmax_kl_backward(reduction):
    s, t = make_logits(6, 10, torch.float32, seed=1), make_logits(6, 10, torch.float32, seed=2)
    g = torch.rand(6) if reduction == "none" else torch.tensor(0.5)
    torch.library.opcheck(torch.ops.rslad_fast._softmax_kl_backward.default, (g, s, t, 2.0, reduction))


PGD_OPCHECK_CPU = pgd_specs((torch.float32, torch.float16))
PGD_OPCHECK_CUDA = pgd_specs((torch.float32, torch.float16, torch.float64))


@compiled
@pytest.mark.parametrize(
    "device,spec",
    per_device([(s,) for s in PGD_OPCHECK_CPU], [(s,) for s in PGD_OPCHECK_CUDA]),
    ids=lambda v: v if isinstance(v, str) else spec_id(v),
)
def test_opcheck_pgd_step(device, spec):
    args, kwargs = pgd_sample(spec, device)
    torch.library.opcheck(torch.ops.rslad_fast.pgd_step_.default, args, kwargs)


@compiled
def test_softmax_kl_under_torch_compile():
    s = make_logits(8, 10, torch.float32).requires_grad_(True)
    t = make_logits(8, 10, torch.float32, seed=3)
    fn = torch.compile(lambda a, b: ops.softmax_kl(a, b, 2.0, "mean"), backend="aot_eager", fullgraph=True)
    out = fn(s, t)
    torch.testing.assert_close(out, reference.softmax_kl(s, t, 2.0, "mean"))
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- bad input


def _kl_bad_cases():
    s = torch.randn(4, 10)
    return [
        ((s, torch.randn(4, 9)), {}, ValueError, "teacher_logits"),
        ((s, torch.randn(4, 10, dtype=torch.float64)), {}, TypeError, "teacher_logits"),
        ((torch.randn(4, 10, 2), torch.randn(4, 10, 2)), {}, ValueError, "student_logits must be 2-D"),
        ((torch.randn(10), torch.randn(10)), {}, ValueError, "student_logits must be 2-D"),
        ((torch.ones(4, 10, dtype=torch.int64), torch.ones(4, 10, dtype=torch.int64)), {}, TypeError, "student_logits"),
        ((s, s), {"temperature": 0.0}, ValueError, "temperature"),
        ((s, s), {"temperature": -1.0}, ValueError, "temperature"),
        ((s, s), {"reduction": "avg"}, ValueError, "reduction"),
        ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "at least one class"),
    ]


def _pgd_bad_cases():
    x = torch.rand(2, 3, 4, 4)
    return [
        ((x.clone(), torch.randn(2, 3, 4, 5), x), {}, ValueError, "grad"),
        ((x.clone(), x, torch.rand(1, 3, 4, 4)), {}, ValueError, "x_nat"),
        ((x.clone(), x.double(), x), {}, TypeError, "grad"),
        ((x.clone().to(torch.uint8), x.to(torch.uint8), x.to(torch.uint8)), {}, TypeError, "x_adv"),
        ((x.clone(), x, x), {"eps": -0.1}, ValueError, "eps"),
        ((x.clone(), x, x), {"alpha": -0.1}, ValueError, "alpha"),
        ((x.clone(), x, x), {"lo": 1.0, "hi": 0.0}, ValueError, "lo must be <= hi"),
    ]


# The Python op, and the raw torch.ops one: the C++ checks hold for callers that go straight to torch.ops
# (and for C++ users).
RAW = (False, pytest.param(True, marks=compiled))


@pytest.mark.parametrize("raw", RAW, ids=("op", "raw_op"))
@pytest.mark.parametrize("case", _kl_bad_cases(), ids=lambda c: c[3])
def test_softmax_kl_bad_input(case, raw):
    args, kwargs, exc, words = case
    kw = {"temperature": 1.0, "reduction": "batchmean", **kwargs}
    fn = torch.ops.rslad_fast.softmax_kl if raw else ops.softmax_kl
    with pytest.raises(exc, match=words):
        fn(*args, kw["temperature"], kw["reduction"])


@pytest.mark.parametrize("raw", RAW, ids=("op", "raw_op"))
@pytest.mark.parametrize("case", _pgd_bad_cases(), ids=lambda c: c[3])
def test_pgd_step_bad_input(case, raw):
    args, kwargs, exc, words = case
    kw = {"eps": 0.03, "alpha": 0.01, "lo": 0.0, "hi": 1.0, **kwargs}
    fn = torch.ops.rslad_fast.pgd_step_ if raw else ops.pgd_step_
    with pytest.raises(exc, match=words):
        fn(*args, kw["eps"], kw["alpha"], kw["lo"], kw["hi"])


@pytest.mark.cuda
@compiled
def test_softmax_kl_refuses_inputs_on_two_devices():
    with pytest.raises(ValueError, match="device"):
        ops.softmax_kl(torch.randn(2, 3, device="cuda"), torch.randn(2, 3))


@compiled
def test_backward_bad_grad_output_shape():
    s = torch.randn(4, 10)
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.rslad_fast._softmax_kl_backward(torch.ones(3), s, s, 1.0, "none")


def test_fallback_announces_itself():
    code = (
        "import sys, warnings; sys.modules['rslad_fast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import rslad_fast, torch\n"
        "print(rslad_fast.ops.backend())\n"
        "print(any('pip install --no-build-isolation -e .' in str(x.message) for x in w))\n"
        "x = torch.rand(2, 3); y = x.clone(); g = torch.randn(2, 3)\n"
        "rslad_fast.ops.pgd_step_(x, g, y, 0.1, 0.05); print(bool((x - y).abs().max() <= 0.1 + 1e-7))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["reference", "True", "True"]
