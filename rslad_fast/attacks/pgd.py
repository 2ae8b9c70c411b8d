"""The one PGD engine: every training attack and every evaluation attack of the PGD family runs here.

Each step takes the input gradient only (torch.autograd.grad on the input, so no parameter gradient is
ever computed or accumulated) and moves with the fused `pgd_step_` op: sign step, projection onto the
l_inf ball around x_nat, clamp to [lo, hi], in one pass.
"""

import contextlib
from typing import Callable, Optional

import torch

from .. import ops

STARTS = ("normal", "uniform", "none")
MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, mode: str):
    """Put the model in `mode` ("eval", "train" or "keep") and restore the modes it had, module by module."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        yield model
    finally:
        for m, training in saved:
            m.training = training


def random_start(
    x_nat: torch.Tensor, start: str, eps: float, init_std: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The attack's starting point, unclamped, as in the official codes (the first step clamps it).

    "normal": x + init_std*N(0,1) (RSLAD, TRADES, MART); "uniform": x + U(-eps, eps) (Madry/SAT, ARD, and the
    PGD_TRADES / PGD_SAT / CW evaluations); "none": x itself (FGSM).
    """
    if start == "none":
        return x_nat.clone()
    if start == "normal":
        noise = torch.randn(x_nat.shape, generator=generator, device=x_nat.device, dtype=x_nat.dtype)
        # One fused add, the same kernel the CUDA-graph path uses, so both start from bitwise the same point.
        return torch.add(x_nat, noise, alpha=init_std)
    if start == "uniform":
        noise = torch.rand(x_nat.shape, generator=generator, device=x_nat.device, dtype=x_nat.dtype)
        return x_nat + (2 * noise - 1) * eps
    raise ValueError(f"start must be one of {STARTS}, got {start!r}")


def check_budget(eps: float, alpha: float, steps: int) -> None:
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1] for inputs in [0, 1], got {eps}")
    if not 0 <= alpha < float("inf"):  # written so that NaN fails too
        raise ValueError(f"alpha (step size) must be a finite number >= 0, got {alpha}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")


def pgd(
    model: torch.nn.Module,
    x_nat: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float,
    alpha: float,
    steps: int,
    start: str = "uniform",
    init_std: float = 0.001,
    mode: str = "eval",
    lo: float = 0.0,
    hi: float = 1.0,
    generator: Optional[torch.Generator] = None,
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Maximize loss_fn(model(x)) over the l_inf ball of radius eps around x_nat; returns a detached x_adv.

    loss_fn maps logits to the scalar to maximize (the sign step makes its scale irrelevant). The model
    runs in `mode` during the attack and gets its own modes back afterwards. `forward` replaces
    `model(x)` (e.g. to add autocast); the modes are still set on `model`.
    """
    check_budget(eps, alpha, steps)
    x_nat = x_nat.detach()
    if steps == 0:
        return x_nat.clone()
    x_adv = random_start(x_nat, start, eps, init_std, generator)
    forward = model if forward is None else forward
    with model_mode(model, mode), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(forward(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            ops.pgd_step_(x_adv, grad, x_nat, eps, alpha, lo, hi)
    return x_adv


def check_logits(logits, target: torch.Tensor) -> torch.Tensor:
    """``logits`` if the model's output is a [batch, classes] tensor shaped like ``target`` (the teacher's
    logits); else one clear error instead of an AttributeError deep in the loss (a model returning a tuple
    or a dict of outputs, a head of another class count)."""
    if not torch.is_tensor(logits):
        raise TypeError(
            f"fused_kl_pgd expects the model to return logits [batch, classes] = {list(target.shape)}, "
            f"got a {type(logits).__name__}; wrap a model that returns several outputs so that it "
            f"returns the logits alone"
        )
    if logits.shape != target.shape:
        raise ValueError(
            f"fused_kl_pgd expects the model to return logits [batch, classes] = {list(target.shape)} "
            f"(the teacher logits' shape), got {list(logits.shape)}"
        )
    return logits


def kl_objective(teacher_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """RSLAD's inner objective, that of `fused_kl_pgd` (eager and CUDA-graphed) and of `RSLAD`:
    logits -> sum_i KL(T(x)_i || S(x')_i) against the teacher's logits, the official
    sum(KLDivLoss(reduction='none')(log_softmax(S(x')), softmax(T(x)))).

    In float32 whatever the student's dtype: under autocast softmax_kl itself takes bf16/fp16 logits as
    float32; the cast here is for a float64 or float16 model run outside autocast."""
    target = teacher_logits.detach().float()

    def objective(logits):
        return ops.softmax_kl(check_logits(logits, target).float(), target, reduction="sum")

    return objective
