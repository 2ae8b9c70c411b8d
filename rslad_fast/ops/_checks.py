"""The argument checks of csrc/ops/checks.h, for the pure-PyTorch fallback: with the compiled library the
C++ checks run (and these do not), so both backends reject bad input with the same words."""

import torch

REDUCTIONS = ("none", "sum", "batchmean", "mean")


def check_is_tensor(t, name):
    """The one check C++ cannot make: the dispatcher itself answers a non-tensor with a schema dump."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rslad_fast: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_floating(t, name):
    check_is_tensor(t, name)
    if not t.is_floating_point():
        raise TypeError(
            f"rslad_fast: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}"
        )


def _check_like(t, ref, name, ref_name):
    check_is_tensor(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"rslad_fast: {name} must have the shape of {ref_name} {list(ref.shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"rslad_fast: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"rslad_fast: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


# Numbers as C++ streams print them (6 significant digits: 1 for 1.0, 1e-05), as checks.h's messages show them.
def check_pgd_args(x_adv, grad, x_nat, eps, alpha, lo, hi):
    _check_floating(x_adv, "x_adv")
    _check_like(grad, x_adv, "grad", "x_adv")
    _check_like(x_nat, x_adv, "x_nat", "x_adv")
    if not eps >= 0:
        raise ValueError(f"rslad_fast: eps must be >= 0, got {eps:g}")
    if not alpha >= 0:
        raise ValueError(f"rslad_fast: alpha must be >= 0, got {alpha:g}")
    if not lo <= hi:
        raise ValueError(f"rslad_fast: lo must be <= hi, got lo={lo:g} hi={hi:g}")


def check_kl_args(student_logits, teacher_logits, temperature, reduction):
    _check_floating(student_logits, "student_logits")
    if student_logits.dim() != 2:
        raise ValueError(
            f"rslad_fast: student_logits must be 2-D [batch, classes], got "
            f"{student_logits.dim()}-D with shape {list(student_logits.shape)}"
        )
    _check_like(teacher_logits, student_logits, "teacher_logits", "student_logits")
    if student_logits.shape[1] < 1:
        raise ValueError("rslad_fast: student_logits must have at least one class")
    if not temperature > 0:
        raise ValueError(f"rslad_fast: temperature must be > 0, got {temperature:g}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"rslad_fast: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
