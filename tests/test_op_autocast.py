"""softmax_kl under torch.autocast (csrc/ops/autocast/, and its copy for the reference fallback), and the one
set of argument checks: the C++ messages are the Python fallback's, word for word."""

import pytest
import torch
from op_samples import make_logits

from rslad_fast import ops
from rslad_fast.ops import _checks

REDUCTIONS = ("none", "sum", "batchmean", "mean")
compiled = pytest.mark.skipif(ops.backend() != "compiled", reason="the compiled op library is not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
DEVICES = ("cpu", pytest.param("cuda", marks=(pytest.mark.cuda, cuda, compiled)))
BACKENDS = (pytest.param("compiled", marks=compiled), "reference")


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(ops, "_BACKEND", "reference")
    return request.param


def _grad_output(out, reduction):
    return torch.linspace(-1.0, 2.0, out.shape[0], device=out.device, dtype=out.dtype) if reduction == "none" else None


def _kl_and_grads(s, t, reduction, autocast_dtype=None):
    s, t = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    if autocast_dtype is None:
        out = ops.softmax_kl(s, t, 2.0, reduction)
    else:
        with torch.autocast(s.device.type, dtype=autocast_dtype):
            out = ops.softmax_kl(s, t, 2.0, reduction)
    out.backward(_grad_output(out, reduction))
    return out.detach(), s.grad, t.grad


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_takes_low_precision_logits_as_float32(backend, device, low, reduction):
    """Under autocast a bf16/fp16 student and a float32 target mix: the op is exactly the float32 op on the
    logits cast to float32 (value float32, gradients in each input's own dtype), as the callers' explicit
    `.float()` made it before."""
    s = make_logits(7, 10, low, device, seed=1)
    t = make_logits(7, 10, torch.float32, device, seed=2)
    out, gs, gt = _kl_and_grads(s, t, reduction, autocast_dtype=low)
    s32 = s.detach().float().requires_grad_(True)
    t32 = t.detach().clone().requires_grad_(True)
    want = ops.softmax_kl(s32, t32, 2.0, reduction)
    want.backward(_grad_output(want, reduction))
    assert out.dtype == torch.float32 and torch.equal(out, want.detach())
    assert gs.dtype == low and torch.equal(gs, s32.grad.to(low))
    assert gt.dtype == torch.float32 and torch.equal(gt, t32.grad)
    # both low-precision: both taken as float32
    out_low, _, gt_low = _kl_and_grads(s, t.to(low), reduction, autocast_dtype=low)
    assert out_low.dtype == torch.float32 and gt_low.dtype == low


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_autocast_leaves_float32_and_float64_bitwise_alone(backend, device, dtype):
    s = make_logits(7, 10, dtype, device, seed=3)
    t = make_logits(7, 10, dtype, device, seed=4)
    for reduction in REDUCTIONS:
        plain = _kl_and_grads(s, t, reduction)
        under = _kl_and_grads(s, t, reduction, autocast_dtype=torch.bfloat16)
        assert under[0].dtype == dtype
        assert all(torch.equal(a, b) for a, b in zip(plain, under))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_outside_autocast_dtypes_are_unchanged(backend):
    s = make_logits(4, 10, torch.bfloat16)
    assert ops.softmax_kl(s, s, reduction="sum").dtype == torch.bfloat16
    with pytest.raises(TypeError, match="teacher_logits must have the dtype of student_logits"):
        ops.softmax_kl(s, s.float())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="teacher_logits"):
        ops.softmax_kl(s.double(), s.float())  # float64 is never cast


@compiled
def test_autocast_under_torch_compile():
    s = make_logits(8, 10, torch.bfloat16, seed=5).requires_grad_(True)
    t = make_logits(8, 10, torch.float32, seed=6)
    fn = torch.compile(lambda a, b: ops.softmax_kl(a, b, 2.0, "mean"), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.softmax_kl(s.detach().float(), t, 2.0, "mean"))
    out.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()


def _message(fn, *args):
    try:
        fn(*args)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None


def _bad_kl_args():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    return [
        (s, torch.randn(4, 9), 1.0, "sum"),
        (s, t.double(), 1.0, "sum"),
        (s, t.int(), 1.0, "sum"),
        (s.long(), t.long(), 1.0, "sum"),
        (torch.randn(4, 10, 2), torch.randn(4, 10, 2), 1.0, "sum"),
        (torch.randn(4, 0), torch.randn(4, 0), 1.0, "sum"),
        (s, t, 0.0, "sum"),
        (s, t, -2.5, "sum"),
        (s, t, float("nan"), "sum"),
        (s, t, 1.0, "avg"),
    ]


def _bad_pgd_args():
    x, y = torch.rand(2, 3, 4, 4), torch.rand(2, 3)
    ok = (0.03, 0.01, 0.0, 1.0)
    return [
        (x.clone(), torch.randn(2, 3, 4, 5), x, *ok),
        (x.clone(), x, torch.rand(1, 3, 4, 4), *ok),
        (x.clone(), x.double(), x, *ok),
        (*(x.to(torch.uint8) for _ in range(3)), *ok),
        (y.clone(), y, y, -0.1, 0.01, 0.0, 1.0),
        (y.clone(), y, y, 0.03, -1e-5, 0.0, 1.0),
        (y.clone(), y, y, float("nan"), 0.01, 0.0, 1.0),
        (y.clone(), y, y, 0.03, 0.01, 1.0, 0.0),
    ]


@compiled
@pytest.mark.parametrize("args", _bad_kl_args())
def test_kl_checks_say_the_same_in_cpp_and_python(args):
    cpp = _message(torch.ops.rslad_fast.softmax_kl, *args)
    assert cpp is not None and cpp == _message(_checks.check_kl_args, *args)


@compiled
@pytest.mark.parametrize("args", _bad_pgd_args())
def test_pgd_checks_say_the_same_in_cpp_and_python(args):
    cpp = _message(torch.ops.rslad_fast.pgd_step_, *args)
    assert cpp is not None and cpp == _message(_checks.check_pgd_args, *args)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_tensors_get_one_line(backend):
    x = torch.rand(2, 3)
    with pytest.raises(TypeError, match=r"^rslad_fast: teacher_logits must be a torch.Tensor, got list$"):
        ops.softmax_kl(x, [1.0])
    with pytest.raises(TypeError, match=r"^rslad_fast: grad must be a torch.Tensor, got float$"):
        ops.pgd_step_(x, 1.0, x, 0.1, 0.1)
