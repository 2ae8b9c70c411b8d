"""RSLAD's inner maximization captured once into a CUDA graph and replayed for every batch; AdaAD's (and
DGAD's), whose objective runs the teacher on x' inside the loop, too (:func:`graphed_pair_pgd`).

The 10-step loop is ~40 small kernels per step (student forward in eval mode, its input-gradient backward,
the fused softmax-KL gradient and the fused PGD step): at CIFAR sizes the GPU spends much of its time
waiting for the CPU to launch them. A CUDA graph launches the whole loop at once.

How it stays correct:
- One graph per (model, input shape and strides, dtype, device, attack settings); an uneven last batch gets
  its own graph, captured once and reused every epoch, so results do not depend on padding.
- Inputs are copied into static buffers before each replay, and the random start's noise is drawn outside
  the graph with the caller's generator into a contiguous buffer, exactly as the eager `random_start` draws
  it (`randn(out=...)` fills memory order: a channels_last buffer would permute the noise), so a replay
  computes exactly what the eager loop computes. `x_adv`'s buffer takes the layout the eager loop's
  `torch.add(x_nat, noise)` gives it, so the student sees the same memory format too.
- The graph reads the parameters where they live: optimizer steps and `load_state_dict` update them in place
  and the next replay sees the new values. Graphs are kept per model in a weak dictionary (a collected
  model's graphs, and their memory pools, go with it; a new model can never inherit a dead one's graphs),
  under a signature of its parameters' and buffers' storage: replacing a tensor (`.to(memory_format=...)`,
  `.half()`, `p.data = ...`) changes the signature and drops that model's graphs, which are recaptured.
- Capture and replay run under a device guard of the input's device (the model may live on a device that
  is not the current one), and the capture is `thread_local`: other threads (DALI's prefetch, a
  DataLoader's pin-memory thread) may keep issuing CUDA calls while this thread captures.
- The student runs in eval mode inside the graph (BatchNorm reads its running statistics and does not write
  them), as in the official `rslad_inner_loss`; its modes are restored afterwards.
- AdaAD's loop holds two models, the student and the teacher, both in eval mode: its graphs are kept per
  teacher (a weak dictionary of caches) and, in that teacher's cache, per student, under the signature of both
  models' tensors, so that replacing a tensor of either (or another teacher) captures anew, and a collected
  teacher's or student's graphs go with it.
"""

import contextlib
import itertools
import weakref
from typing import Callable, Optional

import torch

from .. import ops
from .pgd import check_budget, kl_objective, model_mode


def tensor_signature(model: torch.nn.Module) -> tuple:
    """Where and how every parameter and buffer of `model` is stored: changes when any tensor is replaced."""
    return tuple(
        (t.data_ptr(), t.dtype, t.device, tuple(t.shape), tuple(t.stride()))
        for t in itertools.chain(model.parameters(), model.buffers())
    )


def backend_flags() -> tuple:
    """The math settings a capture bakes in: cuDNN picks its convolution algorithms (TF32 or not, autotuned
    or not, deterministic or not) and cuBLAS its matmul precision when the graph is captured, and a replay
    runs those kernels whatever the flags say later."""
    return (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )


def loop_key(x_nat, target, *, eps, alpha, steps, init_std, amp_dtype) -> tuple:
    """What one captured loop is specific to, besides its model: the input's and target's layout (AdaAD's loop
    has no target: None), the attack's settings, the autocast dtype and :func:`backend_flags` (a graph
    captured under TF32 is not replayed after TF32 is turned off)."""
    return (
        tuple(x_nat.shape),
        x_nat.stride(),
        x_nat.dtype,
        x_nat.device,
        None if target is None else tuple(target.shape),
        float(eps),
        float(alpha),
        int(steps),
        float(init_std),
        amp_dtype,
        backend_flags(),
    )


class GraphCache:
    """Captured loops per model, that cannot outlive their model or survive the replacement of its tensors.

    Device-agnostic (the CPU tests exercise it with plain objects): `get(model, key, build)` returns the
    entry for (model, key), calling `build()` on a miss.
    """

    def __init__(self):
        self._by_model = weakref.WeakKeyDictionary()  # model -> (tensor signature, {key: loop})

    def get(self, model: torch.nn.Module, key: tuple, build: Callable[[], object], also=()):
        """`also`: further models the loop reads (AdaAD's teacher), whose tensors' signature joins `model`'s."""
        signature = (tensor_signature(model), *(tensor_signature(m) for m in also))
        entry = self._by_model.get(model)
        if entry is None or entry[0] != signature:
            entry = (signature, {})  # first call, or tensors replaced: the old graphs read freed memory
            self._by_model[model] = entry
        loops = entry[1]
        if key not in loops:
            loops[key] = build()
        return loops[key]

    def clear(self) -> None:
        self._by_model.clear()

    def __len__(self) -> int:
        """Number of captured loops held, over all live models."""
        return sum(len(loops) for _, loops in self._by_model.values())


_GRAPHS = GraphCache()
_PAIR_GRAPHS = weakref.WeakKeyDictionary()  # teacher -> GraphCache of the (student, teacher) loops


def clear_cache() -> None:
    """Drop every captured graph (not needed for correctness: stale graphs are detected)."""
    _GRAPHS.clear()
    _PAIR_GRAPHS.clear()


def pair_cache(teacher: torch.nn.Module) -> GraphCache:
    """The cache of the loops that read `teacher` (keyed in it by their student); it dies with the teacher."""
    cache = _PAIR_GRAPHS.get(teacher)
    if cache is None:
        cache = _PAIR_GRAPHS[teacher] = GraphCache()
    return cache


def static_buffers(x_nat: torch.Tensor, target: torch.Tensor, init_std: float) -> dict:
    """The loop's static buffers, laid out as the eager loop lays out its tensors (see the module doc); no
    target buffer (None) for a loop without a target (AdaAD's)."""
    x_nat_s = torch.empty_like(x_nat)  # keeps x_nat's strides (contiguous or channels_last)
    noise = torch.empty(x_nat.shape, dtype=x_nat.dtype, device=x_nat.device)  # contiguous, as random_start's
    x_adv = torch.add(x_nat_s, noise, alpha=init_std)  # the eager loop's x_adv layout, by the same op
    return {
        "x_nat": x_nat_s,
        "noise": noise,
        "x_adv": x_adv,
        "target": None if target is None else torch.empty(target.shape, dtype=target.dtype, device=target.device),
    }


def draw_noise(noise: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The random start's N(0, 1) draw into `noise`, the same numbers as `random_start` draws."""
    return torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype, out=noise)


class _GraphedLoop:
    """`model` is called during the warm-up and the capture only, and not kept (a cache entry must not hold
    the models it is weakly keyed by). `objective`: a function of the model's output, for a loop without a
    target (AdaAD's); None: RSLAD's KL against the static target buffer."""

    def __init__(self, model, x_nat, target, *, eps, alpha, steps, init_std, amp_dtype, warmup=3, objective=None):
        buffers = static_buffers(x_nat, target, init_std)
        self.x_nat, self.noise, self.x_adv, self.target = (buffers[k] for k in ("x_nat", "noise", "x_adv", "target"))
        self.eps, self.alpha, self.steps, self.init_std, self.amp_dtype = eps, alpha, steps, init_std, amp_dtype
        # RSLAD's reads the static target buffer at every replay
        self.objective = kl_objective(self.target) if objective is None else objective
        self.x_nat.copy_(x_nat)
        if target is not None:
            self.target.copy_(target)
        self.noise.zero_()  # any values do for the warm-up and capture; a draw would move the global RNG

        side = torch.cuda.Stream(device=x_nat.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning and allocations happen outside the capture
            for _ in range(warmup):
                self._body(model)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # On the input's device's own side stream (torch's default capture stream is made once, on whichever
        # device was current at its first use).
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
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
                loss = self.objective(logits)  # checks the logits: raises in the eager warm-up, before capture
                (grad,) = torch.autograd.grad(loss, x)
                # In place on the static buffer: the backward that read x has finished.
                ops.pgd_step_(self.x_adv, grad, self.x_nat, self.eps, self.alpha)

    def run(self, x_nat, target, generator):
        self.x_nat.copy_(x_nat)
        if target is not None:
            self.target.copy_(target)
        draw_noise(self.noise, generator)
        self.graph.replay()
        return self.x_adv.clone()


def graphed_kl_pgd(
    model: torch.nn.Module,
    x_nat: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    init_std: float = 0.001,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
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
    key = loop_key(x_nat, target, eps=eps, alpha=alpha, steps=steps, init_std=init_std, amp_dtype=amp_dtype)
    with torch.cuda.device(x_nat.device), model_mode(model, "eval"), torch.autocast("cuda", enabled=False):
        loop = _GRAPHS.get(
            model,
            key,
            lambda: _GraphedLoop(
                model, x_nat, target, eps=eps, alpha=alpha, steps=steps, init_std=init_std, amp_dtype=amp_dtype
            ),
        )
        return loop.run(x_nat, target, generator)


def graphed_pair_pgd(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    x_nat: torch.Tensor,
    objective: Callable[[tuple], torch.Tensor],
    *,
    eps: float,
    alpha: float,
    steps: int,
    init_std: float,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """AdaAD's inner maximization through a CUDA graph: what `pgd(pair, x_nat, objective, start="normal",
    mode="eval", ...)` computes on the pair x -> (student(x), teacher(x)), both models in eval mode and the
    input gradient through both: start x + init_std*N(0,1) (the noise drawn outside the graph with
    `generator`), `steps` sign steps, each projected onto the eps ball and clamped to [0, 1].

    `objective` maps the pair's output (S(x'), T(x')) to the scalar to maximize; it is part of the key and
    kept by the cache, so it must hold no model (a module-level function such as AdaAD's `adaad_objective`).
    Under the caller's autocast the pair's forward runs under autocast to its dtype, as the eager engine's.
    """
    if not x_nat.is_cuda:
        raise ValueError("graphed_pair_pgd needs CUDA tensors")
    check_budget(eps, alpha, steps)
    x_nat = x_nat.detach()
    if steps == 0:
        return x_nat.clone()
    if amp_dtype is None and torch.is_autocast_enabled("cuda"):
        amp_dtype = torch.get_autocast_dtype("cuda")  # the caller's precision, under our own autocast (see above)
    key = (*loop_key(x_nat, None, eps=eps, alpha=alpha, steps=steps, init_std=init_std, amp_dtype=amp_dtype), objective)

    def pair(x):
        return student(x), teacher(x)

    with (
        torch.cuda.device(x_nat.device),
        model_mode(student, "eval"),
        model_mode(teacher, "eval"),
        torch.autocast("cuda", enabled=False),
    ):
        loop = pair_cache(teacher).get(
            student,
            key,
            lambda: _GraphedLoop(
                pair,
                x_nat,
                None,
                eps=eps,
                alpha=alpha,
                steps=steps,
                init_std=init_std,
                amp_dtype=amp_dtype,
                objective=objective,
            ),
            also=(teacher,),
        )
        return loop.run(x_nat, None, generator)
