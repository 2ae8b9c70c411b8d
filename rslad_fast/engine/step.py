"""One training step, shared by the training loop and the benchmarks, so what is timed is what trains.

- The teacher's forward runs under `inference_mode` (no autograd bookkeeping at all) and, with `amp_dtype`,
  under autocast; its logits are cloned out of inference mode as float32, so they can serve as autograd
  targets (TRADES-style losses save them for backward).
- The student's forward and backward passes (attack included) run under autocast to `amp_dtype` when it is
  set; the parameters, their gradients and the optimizer state stay float32 (fp32 master weights).
- Evaluation attacks never go through here: they always run in float32.
- Under DDP (torchrun), `student` is the DistributedDataParallel wrapper: the method's training forwards go
  through it (so backward all-reduces the gradients), while its attack and no-grad passes run on the plain
  module, `ctx.attack_model`: the input-gradient passes then trigger no gradient all-reduce, and the
  CUDA-graph attack loop captures the module's own kernels. In a single process both are the same module.
"""

import contextlib
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from ..methods.base import Context

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # config.amp -> the autocast dtype (None: no autocast)


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def teacher_logits(teacher: torch.nn.Module, x: torch.Tensor, amp_dtype: Optional[torch.dtype] = None):
    with torch.inference_mode(), autocast(x.device, amp_dtype):
        logits = teacher(x)
    return logits.float().clone()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper; any other model unchanged."""

    return model.module if isinstance(model, DistributedDataParallel) else model


def train_step(
    student,
    method,
    optimizer,
    x,
    y,
    *,
    teacher=None,
    epoch: int = 0,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
    cache=None,
    views: Optional[torch.Tensor] = None,
    fold=None,
):
    """Runs one SGD step of `method` on (x, y); returns (detached loss, the method's Context with stats).

    `student` may be a DDP wrapper; the attacks then run on the module inside it (see the module doc).
    `cache` (an engine.teacher_cache.TeacherCache) with the batch's `views` serves T(x), the teacher run on
    its misses only; every other teacher call of the method (ctx.teacher) bypasses it. `fold` (a
    models.fold.FoldedCopy of the student, for a method whose attack runs in eval mode) is refreshed from
    the student's current weights and statistics and serves as the attack's model."""
    t_logits = None
    if teacher is not None:
        if cache is not None:
            if views is None:
                raise ValueError("train_step: a teacher cache needs the batch's view ids")
            t_logits = cache.logits(teacher, x, views, amp_dtype)
        else:
            t_logits = teacher_logits(teacher, x, amp_dtype)
    ctx = Context(
        student=student,
        x=x,
        y=y,
        teacher=teacher,
        teacher_logits=t_logits,
        epoch=epoch,
        generator=generator,
        attack_model=fold.refresh() if fold is not None else unwrap(student),
    )
    student.train()
    with autocast(x.device, amp_dtype):
        loss = method.loss(ctx)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), ctx
