"""RSLAD's inner maximization captured once into a CUDA graph and replayed for every batch.

The 10-step loop is ~40 small kernels per step (student forward in eval mode, its input-gradient backward,
the fused softmax-KL gradient and the fused PGD step): at CIFAR sizes the GPU spends much of its time
waiting for the CPU to launch them. A CUDA graph launches the whole loop at once.

How it stays correct:
- One graph per (model, input shape, dtype, memory format, attack settings); an uneven last batch gets its
  own graph, captured once and reused every epoch, so results do not depend on padding.
- Inputs are copied into static buffers before each replay, and the random start's noise is drawn outside
  the graph with the caller's generator, so a replay computes exactly what the eager loop computes.
- The graph reads the parameters where they live: optimizer steps update them in place and the next replay
  sees the new weights. Replacing a parameter tensor (not its values) requires `clear_cache()`.
- The student runs in eval mode inside the graph (BatchNorm reads its running statistics and does not write
  them), as in the official `rslad_inner_loss`; its modes are restored afterwards.
"""
import contextlib
import weakref
from typing import Optional

import torch

from .. import ops
from .pgd import check_budget, model_mode

_GRAPHS = {}


def clear_cache() -> None:
    """Drop every captured graph (e.g. after replacing a model's parameter tensors)."""
    _GRAPHS.clear()


class _GraphedLoop:
    def __init__(self, model, x_nat, target, *, eps, alpha, steps, init_std, amp_dtype, warmup=3):
        self.model_ref = weakref.ref(model)
        memory_format = torch.channels_last if x_nat.is_contiguous(memory_format=torch.channels_last) and \
            not x_nat.is_contiguous() else torch.contiguous_format
        self.x_nat = torch.empty_like(x_nat, memory_format=memory_format)
        self.target = torch.empty_like(target)
        self.noise = torch.empty_like(self.x_nat)
        self.x_adv = torch.empty_like(self.x_nat)
        self.eps, self.alpha, self.steps, self.init_std, self.amp_dtype = eps, alpha, steps, init_std, amp_dtype
        self.x_nat.copy_(x_nat)
        self.target.copy_(target)
        self.noise.normal_()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning and allocations happen outside the capture
            for _ in range(warmup):
                self._body(model)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body(model)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # The autocast weight cache must be off inside a capture.
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    def _body(self, model):
        torch.add(self.x_nat, self.noise, alpha=self.init_std, out=self.x_adv)
        with torch.enable_grad():
            for _ in range(self.steps):
                x = self.x_adv.detach().requires_grad_(True)
                with self._autocast():
                    logits = model(x)
                loss = ops.softmax_kl(logits.float(), self.target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
                # In place on the static buffer: the backward that read x has finished.
                ops.pgd_step_(self.x_adv, grad, self.x_nat, self.eps, self.alpha)

    def run(self, x_nat, target, generator):
        self.x_nat.copy_(x_nat)
        self.target.copy_(target)
        torch.randn(self.noise.shape, generator=generator, device=self.noise.device, dtype=self.noise.dtype,
                    out=self.noise)
        self.graph.replay()
        return self.x_adv.clone()


def graphed_kl_pgd(model: torch.nn.Module, x_nat: torch.Tensor, teacher_logits: torch.Tensor, *,
                   eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, init_std: float = 0.001,
                   generator: Optional[torch.Generator] = None,
                   amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`fused_kl_pgd` through a CUDA graph (see the module docstring). Same arguments and result."""
    if not x_nat.is_cuda:
        raise ValueError("graphed_kl_pgd needs CUDA tensors")
    check_budget(eps, alpha, steps)
    x_nat = x_nat.detach()
    if steps == 0:
        return x_nat.clone()
    target = teacher_logits.detach().float()
    if amp_dtype is None and torch.is_autocast_enabled("cuda"):
        # Called inside the caller's autocast: capture with the same precision, but with our own autocast
        # (the caller's has its weight cache on, which a capture forbids).
        amp_dtype = torch.get_autocast_dtype("cuda")
    channels_last = x_nat.is_contiguous(memory_format=torch.channels_last) and not x_nat.is_contiguous()
    key = (id(model), tuple(x_nat.shape), x_nat.dtype, x_nat.device, channels_last, tuple(target.shape),
           float(eps), float(alpha), int(steps), float(init_std), amp_dtype)
    with model_mode(model, "eval"), torch.autocast("cuda", enabled=False):
        loop = _GRAPHS.get(key)
        if loop is None or loop.model_ref() is not model:
            loop = _GRAPHS[key] = _GraphedLoop(model, x_nat, target, eps=eps, alpha=alpha, steps=steps,
                                               init_std=init_std, amp_dtype=amp_dtype)
        return loop.run(x_nat, target, generator)
