"""The fused ops: `pgd_step_` and `softmax_kl`.

They run the compiled kernels of rslad_fast._C (csrc/) when the library is built, and the pure-PyTorch
reference (rslad_fast.ops.reference) otherwise. `backend()` says which; the fallback warns once, at import.
"""

import os
import warnings

import torch

from . import reference
from ._checks import REDUCTIONS, check_is_tensor, check_kl_args, check_pgd_args

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` in the rslad_fast source tree"

try:
    from rslad_fast import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as _error:  # the library is absent or does not match this torch
    _BACKEND = "reference"
    _IMPORT_ERROR = _error
    warnings.warn(
        f"rslad_fast: the compiled op library is not available ({_error}); using the slower "
        f"pure-PyTorch reference ops. To get the fused kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    _BACKEND = "compiled"
    _IMPORT_ERROR = None
    from . import _registration  # noqa: F401


def backend() -> str:
    """'compiled' when the fused kernels of rslad_fast._C are in use, 'reference' for the fallback."""
    return _BACKEND


_CUDA_KERNELS = _BACKEND == "compiled" and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rslad_fast::softmax_kl", "CUDA"
)

NO_CUDA_KERNELS = (
    "rslad_fast: the compiled op library was built without CUDA kernels (nvcc was not found at "
    "build time), so it cannot run on CUDA tensors; rebuild it with `CUDA_HOME=/usr/local/cuda "
    "RSLAD_FAST_CUDA=1 pip install --no-build-isolation -e .` (RSLAD_FAST_CUDA=1 fails loudly "
    "when the CUDA kernels cannot be built)"
)


def cuda_kernels_available() -> bool:
    """Whether the compiled library holds CUDA kernels (it was built with nvcc)."""
    return _CUDA_KERNELS


# RSLAD_FAST_REQUIRE=compiled | cuda: fail at import instead of falling back (`compiled`: the compiled
# library must load; `cuda`: it must also hold CUDA kernels). scripts/gpu_check.sh sets `cuda` for every
# stage, so no figure or test result can silently come from the reference ops.
_REQUIRE = os.environ.get("RSLAD_FAST_REQUIRE", "")
if _REQUIRE not in ("", "compiled", "cuda"):
    raise ImportError(f"RSLAD_FAST_REQUIRE must be 'compiled' or 'cuda', got {_REQUIRE!r}")
if _REQUIRE and _BACKEND != "compiled":
    raise ImportError(
        f"RSLAD_FAST_REQUIRE={_REQUIRE}: the compiled op library did not load ({_IMPORT_ERROR}); {BUILD_HINT}"
    )
if _REQUIRE == "cuda" and not _CUDA_KERNELS:
    raise ImportError(f"RSLAD_FAST_REQUIRE=cuda: {NO_CUDA_KERNELS}")


def check_device(device) -> None:
    """Raise RuntimeError (NO_CUDA_KERNELS) when the ops cannot run on `device`: a compiled library without
    CUDA kernels would otherwise fail deep in the first attack with a dispatcher error. The reference
    fallback runs anywhere."""
    if torch.device(device).type == "cuda" and _BACKEND == "compiled" and not _CUDA_KERNELS:
        raise RuntimeError(NO_CUDA_KERNELS)


def pgd_step_(x_adv, grad, x_nat, eps, alpha, lo=0.0, hi=1.0):
    """One PGD step in place: x_adv <- clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), lo, hi).

    sign(0) = 0 as in torch.sign. All three tensors share shape, dtype and device. Returns x_adv.
    """
    if _BACKEND == "compiled":
        for t, name in ((x_adv, "x_adv"), (grad, "grad"), (x_nat, "x_nat")):
            check_is_tensor(t, name)  # the rest is checked in C++ (csrc/ops/checks.h)
        if x_adv.is_cuda and not _CUDA_KERNELS:
            check_device(x_adv.device)
        torch.ops.rslad_fast.pgd_step_(x_adv, grad, x_nat, float(eps), float(alpha), float(lo), float(hi))
        return x_adv
    check_pgd_args(x_adv, grad, x_nat, eps, alpha, lo, hi)
    return reference.pgd_step_(x_adv, grad, x_nat, eps, alpha, lo, hi)


def _autocast_to_float(t):
    """What the compiled op's Autocast kernels do (csrc/ops/autocast/), for the reference fallback: under
    torch.autocast on t's device type, float16 and bfloat16 logits become float32."""
    if (
        isinstance(t, torch.Tensor)
        and t.dtype in (torch.float16, torch.bfloat16)
        and torch.is_autocast_enabled(t.device.type)
    ):
        return t.float()
    return t


def softmax_kl(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """KL(softmax(teacher/T) || softmax(student/T)) over the classes of [B, C] logits.

    The official RSLAD code's `KLDivLoss(log_softmax(S), softmax(T))`. reduction: "none" ([B]), "sum",
    "batchmean" (sum/B) or "mean" (sum/(B*C), the official RSLAD convention). No T^2 factor: callers apply
    it. Differentiable in both arguments (TRADES and IAD backpropagate through their target).

    Both arguments share shape, dtype and device; the result has their dtype. Under torch.autocast the op
    follows torch's float32 policy (that of log_softmax and kl_div): float16 and bfloat16 logits are taken
    as float32, so a student's bf16 logits and a float32 target mix, and the result is float32; float32 and
    float64 logits are used as they are, outside autocast too.
    """
    if _BACKEND == "compiled":
        check_is_tensor(student_logits, "student_logits")  # the rest is checked in C++ (csrc/ops/checks.h)
        check_is_tensor(teacher_logits, "teacher_logits")
        if student_logits.is_cuda and not _CUDA_KERNELS:
            check_device(student_logits.device)
        return torch.ops.rslad_fast.softmax_kl(student_logits, teacher_logits, float(temperature), reduction)
    student_logits, teacher_logits = _autocast_to_float(student_logits), _autocast_to_float(teacher_logits)
    check_kl_args(student_logits, teacher_logits, temperature, reduction)
    return reference.softmax_kl(student_logits, teacher_logits, temperature, reduction)


__all__ = ["pgd_step_", "softmax_kl", "backend", "cuda_kernels_available", "check_device", "reference", "REDUCTIONS"]
