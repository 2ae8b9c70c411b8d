"""Pure-PyTorch reference of every fused op.

These are the eager composites the fused kernels replace, written the way the official codes write them.
They are the test oracle, and the fallback when the compiled library is absent (rslad_fast.ops.backend()
then says "reference").

Half and bfloat16 inputs are computed in float32 and rounded once at the end, as the kernels do, so
the oracle is at least as accurate as the op it checks.
"""

import torch
import torch.nn.functional as F

from ._checks import REDUCTIONS


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@torch.no_grad()
def pgd_step_(x_adv, grad, x_nat, eps, alpha, lo=0.0, hi=1.0):
    """x_adv <- clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), lo, hi), in place.

    The projection is min/max against x_nat -/+ eps, as in RSLAD's `rslad_inner_loss` and TRADES'
    `trades_loss`.
    """
    x, g, nat = _upcast(x_adv), _upcast(grad), _upcast(x_nat)
    stepped = x + alpha * torch.sign(g)
    projected = torch.min(torch.max(stepped, nat - eps), nat + eps)
    x_adv.copy_(torch.clamp(projected, lo, hi))
    return x_adv


def softmax_kl(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """KL(softmax(teacher/T) || softmax(student/T)) over dim 1.

    Equal to `F.kl_div(log_softmax(S/T), softmax(T/T), reduction=...)` of the official RSLAD code, formed
    in log space. A class of teacher probability 0 (a logit of -inf, or one whose probability underflows)
    contributes exactly 0 and gets gradient 0, even where the student's is 0 too; a NaN logit makes its row
    NaN. An empty batch gives zeros.
    """
    s, t = _upcast(student_logits), _upcast(teacher_logits)
    log_q = F.log_softmax(s / temperature, dim=1)
    log_p = F.log_softmax(t / temperature, dim=1)
    p = log_p.exp()
    # Where p == 0 the log ratio can be -inf (or -inf - -inf): 0 * it would be NaN, in the value and, through
    # the multiplication's backward, in the gradients. NaN == 0 is False, so NaN still propagates.
    log_ratio = torch.where(p == 0, 0.0, log_p - log_q)
    per_row = (p * log_ratio).sum(dim=1)
    rows, classes = s.shape
    if reduction == "none":
        out = per_row
    elif reduction == "sum":
        out = per_row.sum()
    elif reduction == "batchmean":
        out = per_row.sum() / max(rows, 1)
    elif reduction == "mean":
        out = per_row.sum() / max(rows * classes, 1)
    else:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return out.to(student_logits.dtype)
