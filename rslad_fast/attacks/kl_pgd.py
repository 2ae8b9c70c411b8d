"""RSLAD's inner maximization as one call, :func:`fused_kl_pgd`: the CUDA-graphed loop (``graphed.py``) on CUDA
inputs, the eager PGD engine (``pgd.py``) otherwise.

Its own module because it chooses between the two and the graphed loop builds on the engine: the engine
never imports the loop that specializes it.
"""

import math
import numbers
from typing import Optional

import torch

from .graphed import graphed_kl_pgd
from .pgd import kl_objective, pgd


def fused_kl_pgd(
    model: torch.nn.Module,
    x_nat: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    init_std: float = 0.001,
    cuda_graph="auto",
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """RSLAD's inner maximization as one drop-in call: x' = argmax_{|x'-x|inf<=eps} KL(T(x) || S(x')).

    Defaults are the official RSLAD code's `rslad_inner_loss`: eps 8/255, 10 steps of 2/255, start
    x + 0.001*N(0,1), the student in eval mode, loss sum(KLDivLoss(log_softmax(S(x')), softmax(T(x)))).
    The model's modes are restored and no parameter gradient is accumulated.

    cuda_graph: "auto" captures the whole loop into a CUDA graph on CUDA inputs and runs eagerly on the
    CPU; True requires the graph (CUDA only); False always runs eagerly.
    amp_dtype: run the student's forward under autocast to this dtype (e.g. torch.bfloat16); the KL and
    the step stay in float32. None: the caller's autocast state, if any, applies.
    """
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is True and not x_nat.is_cuda:
        raise ValueError("cuda_graph=True needs CUDA tensors; use cuda_graph='auto' or False on the CPU")
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != x_nat.shape[0]:
        raise ValueError(
            f"teacher_logits must be [batch, classes] with batch {x_nat.shape[0]}, got {list(teacher_logits.shape)}"
        )
    if (
        isinstance(init_std, bool)
        or not isinstance(init_std, numbers.Real)
        or not math.isfinite(init_std)
        or init_std < 0
    ):
        raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
    target = teacher_logits.detach()
    use_graph = x_nat.is_cuda and cuda_graph in ("auto", True)
    if use_graph:
        return graphed_kl_pgd(
            model,
            x_nat,
            target,
            eps=eps,
            alpha=alpha,
            steps=steps,
            init_std=init_std,
            generator=generator,
            amp_dtype=amp_dtype,
        )
    forward = model
    if amp_dtype is not None:

        def forward(x):
            with torch.autocast(x.device.type, dtype=amp_dtype):
                return model(x)

    return pgd(
        model,
        x_nat,
        kl_objective(target),
        eps=eps,
        alpha=alpha,
        steps=steps,
        start="normal",
        init_std=init_std,
        mode="eval",
        generator=generator,
        forward=forward,
    )
