"""AdaAD's (and DGAD's) attack through a CUDA graph that holds two models (attacks.graphed.graphed_pair_pgd).

On the CPU: the pair cache's keying (per teacher, per student, the signature of both models' tensors), the
`cuda_graph` switch and the dispatch of AdaAD's attack (eager on the CPU, the graph on CUDA inputs). Under
the `cuda` mark: the replay against the eager engine from the same generator state, in fp32 and under bf16
autocast, after an optimizer step (through the folded copy) and an in-place change of the teacher, after a
teacher tensor is replaced, and on an uneven last batch.
"""

import contextlib
import gc
import types
import weakref

import pytest
import torch

from rslad_fast.attacks import graphed
from rslad_fast.attacks.pgd import model_mode
from rslad_fast.engine.teacher import cast_teacher, freeze
from rslad_fast.errors import UserError
from rslad_fast.methods import DGAD, AdaAD, Context
from rslad_fast.methods import adaad as adaad_module
from rslad_fast.models import build
from rslad_fast.models.fold import FoldedCopy

pytestmark = pytest.mark.usefixtures("one_thread")  # the test machine's cores are shared


class _Built:
    count = 0

    def __init__(self):
        type(self).count += 1


def _get(cache, student, teacher, key=("k",)):
    return cache.get(student, key, _Built, also=(teacher,))


# ---- the pair cache (device-agnostic) -------------------------------------------------------------------


def test_pair_cache_is_per_teacher_and_per_student():
    graphed.clear_cache()
    student, teacher, other = build("tiny"), build("tiny"), build("tiny")
    a = _get(graphed.pair_cache(teacher), student, teacher)
    assert _get(graphed.pair_cache(teacher), student, teacher) is a  # same pair, same key: reused
    assert graphed.pair_cache(teacher) is graphed.pair_cache(teacher)
    b = _get(graphed.pair_cache(other), student, other)  # another teacher: its own loop
    assert b is not a and graphed.pair_cache(other) is not graphed.pair_cache(teacher)
    c = _get(graphed.pair_cache(teacher), build("tiny"), teacher)  # another student
    assert c is not a


def test_in_place_teacher_updates_keep_the_loop():
    student, teacher = build("tiny"), build("tiny")
    cache = graphed.GraphCache()
    loop = _get(cache, student, teacher)
    teacher.load_state_dict(build("tiny").state_dict())  # copy_ into the same storage
    with torch.no_grad():
        next(teacher.parameters()).mul_(0.5)
    assert _get(cache, student, teacher) is loop


@pytest.mark.parametrize("replace", ["data", "half", "channels_last", "buffer"])
def test_replacing_a_teacher_tensor_recaptures(replace):
    student, teacher = build("tiny"), build("tiny")
    cache = graphed.GraphCache()
    loop = _get(cache, student, teacher)
    _get(cache, student, teacher, key=("second",))
    if replace == "data":
        p = next(teacher.parameters())
        p.data = p.data.clone()
    elif replace == "half":
        teacher.half()  # the dtype is in the signature
    elif replace == "channels_last":
        teacher.to(memory_format=torch.channels_last)
    else:
        name, buf = next((n, b) for n, b in teacher.named_buffers() if b.is_floating_point())
        module_name, _, attr = name.rpartition(".")
        setattr(teacher.get_submodule(module_name), attr, buf.clone())
    fresh = _get(cache, student, teacher)
    assert fresh is not loop and len(cache) == 1  # the stale loops are dropped


def test_replacing_a_student_tensor_recaptures():
    student, teacher = build("tiny"), build("tiny")
    cache = graphed.GraphCache()
    loop = _get(cache, student, teacher)
    p = next(student.parameters())
    p.data = p.data.clone()
    assert _get(cache, student, teacher) is not loop and len(cache) == 1


def test_a_collected_teacher_takes_its_loops_with_it():
    graphed.clear_cache()
    student, teacher = build("tiny"), build("tiny")
    loop = _get(graphed.pair_cache(teacher), student, teacher)
    ref = weakref.ref(loop)
    del teacher, loop
    gc.collect()
    assert len(graphed._PAIR_GRAPHS) == 0 and ref() is None


def test_the_pair_key_has_no_target_and_differs_from_rslads():
    x, t = torch.zeros(2, 3, 4, 4), torch.zeros(2, 10)
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=10, init_std=0.001, amp_dtype=None)
    assert graphed.loop_key(x, None, **kw) != graphed.loop_key(x, t, **kw)
    assert graphed.loop_key(x, None, **kw) != graphed.loop_key(x, None, **dict(kw, amp_dtype=torch.bfloat16))
    buf = graphed.static_buffers(x, None, 0.001)
    assert buf["target"] is None and buf["noise"].is_contiguous()


def test_graphed_pair_pgd_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        graphed.graphed_pair_pgd(
            build("tiny"), build("tiny"), torch.rand(2, 3, 32, 32), adaad_module.adaad_objective,
            eps=8 / 255, alpha=2 / 255, steps=1, init_std=0.001,
        )  # fmt: skip


# ---- the switch and AdaAD's dispatch --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AdaAD, DGAD])
def test_cuda_graph_switch(cls):
    assert cls().cuda_graph == "auto"
    assert cls(cuda_graph="false").cuda_graph is False and cls(cuda_graph=" True ").cuda_graph is True
    with pytest.raises(UserError, match="cuda_graph"):
        cls(cuda_graph="sometimes")
    cuda, cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    assert cls().uses_graph(cuda) and cls(cuda_graph=True).uses_graph(cuda)
    assert not cls(cuda_graph=False).uses_graph(cuda) and not cls().uses_graph(cpu)
    with pytest.raises(ValueError, match="CUDA"):
        cls(cuda_graph=True).uses_graph(cpu)


def _ctx(device="cpu", batch=4, seed=0):
    torch.manual_seed(0)
    student, teacher = build("tiny").to(device), build("tiny").to(device).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.arange(batch, device=device) % 10
    return Context(student=student, x=x, y=y, teacher=teacher, generator=torch.Generator(device).manual_seed(seed))


@pytest.mark.parametrize("cuda_graph", ["auto", False])
def test_the_cpu_attack_stays_eager(monkeypatch, cuda_graph):
    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA graph on the CPU")

    monkeypatch.setattr(adaad_module, "graphed_pair_pgd", refuse)
    ctx = _ctx()
    method = AdaAD(steps=2, cuda_graph=cuda_graph)
    out = method.attack(ctx)
    ctx.generator.manual_seed(0)
    pair = adaad_module.StudentTeacher(ctx.attack_model, ctx.teacher)
    eager = adaad_module.pgd(pair, ctx.x, adaad_module.adaad_objective, **method.pgd_settings(ctx))
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [AdaAD, DGAD])
def test_a_graphed_attack_gets_the_pair_and_the_settings(monkeypatch, cls):
    seen = []
    monkeypatch.setattr(cls, "uses_graph", lambda self, x: True)
    monkeypatch.setattr(adaad_module, "graphed_pair_pgd", lambda *a, **kw: seen.append((a, kw)) or "x'")
    ctx = _ctx()
    assert cls(steps=3, eps=4 / 255).attack(ctx) == "x'"
    ((args, kwargs),) = seen
    assert args[0] is ctx.attack_model and args[1] is ctx.teacher and args[2] is ctx.x
    assert args[3] is adaad_module.adaad_objective
    assert kwargs == dict(eps=4 / 255, alpha=2 / 255, steps=3, init_std=0.001, generator=ctx.generator)


def test_the_captured_body_computes_the_eager_attack():
    """What the graph captures (the loop's body on its static buffers, the noise drawn outside it with the
    batch's generator), run on the CPU without a capture: bitwise AdaAD's eager attack."""
    ctx = _ctx(batch=4)
    method = AdaAD(steps=3)
    buf = graphed.static_buffers(ctx.x, None, method.init_std)
    loop = object.__new__(graphed._GraphedLoop)  # its __init__ captures on CUDA; the body alone here
    loop.x_nat, loop.noise, loop.x_adv = buf["x_nat"], buf["noise"], buf["x_adv"]
    loop.eps, loop.alpha, loop.steps, loop.init_std = method.eps, method.step_size, method.steps, method.init_std
    loop.amp_dtype, loop.objective = None, adaad_module.adaad_objective
    loop.x_nat.copy_(ctx.x)
    graphed.draw_noise(loop.noise, torch.Generator().manual_seed(5))
    pair = adaad_module.StudentTeacher(ctx.attack_model, ctx.teacher)
    with model_mode(pair, "eval"):
        loop._body(pair)
    ctx.generator = torch.Generator().manual_seed(5)
    eager = method.attack(ctx)
    assert not torch.equal(eager, ctx.x)
    torch.testing.assert_close(loop.x_adv, eager, rtol=0, atol=0)


# ---- on a GPU: the replay against the eager engine ----------------------------------------------------


def _deterministic():
    graphed.clear_cache()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def _both(ctx, seed=0, method=None, amp=None):
    """The graphed and the eager attack of `method` on ctx, each from generator seed `seed`."""
    method = method or AdaAD()
    out = []
    for graph in (True, False):
        method.cuda_graph = graph
        ctx.generator = torch.Generator(ctx.x.device).manual_seed(seed)
        with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
            out.append(method.attack(ctx))
    method.cuda_graph = "auto"
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("cls", [AdaAD, DGAD])
def test_replay_equals_eager(amp, cls):
    _deterministic()
    ctx = _ctx("cuda", batch=16)
    graph, eager = _both(ctx, method=cls(), amp=amp)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert not torch.equal(graph, ctx.x) and (graph - ctx.x).abs().max().item() <= 8 / 255 + 1e-6
    again, _ = _both(ctx, seed=1, method=cls(), amp=amp)  # a replay of the same graph, other noise
    assert len(graphed.pair_cache(ctx.teacher)) == 1 and not torch.equal(again, graph)


@pytest.mark.cuda
def test_replay_after_an_optimizer_step_and_an_in_place_teacher_change():
    """Through the folded copy, as the engine runs it: one capture; after an SGD step on the student (and
    refresh()) and after the teacher's weights change in place, the replay is the eager attack on the new
    weights, and differs from the first."""
    _deterministic()
    ctx = _ctx("cuda", batch=16)
    model = ctx.student.to(memory_format=torch.channels_last)
    fold = FoldedCopy(model)
    ctx.attack_model = fold.refresh()
    first, eager = _both(ctx)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    torch.nn.functional.cross_entropy(model(ctx.x), ctx.y).backward()
    opt.step()
    ctx.attack_model = fold.refresh()
    after_step, eager = _both(ctx)
    torch.testing.assert_close(after_step, eager, rtol=0, atol=0)
    assert not torch.equal(after_step, first)
    teacher = ctx.teacher
    teacher.load_state_dict(build("tiny").to("cuda").state_dict())  # in place
    after_teacher, eager = _both(ctx)
    torch.testing.assert_close(after_teacher, eager, rtol=0, atol=0)
    assert not torch.equal(after_teacher, after_step)
    assert len(graphed.pair_cache(teacher)) == 1  # replayed every time, never recaptured


@pytest.mark.cuda
def test_replacing_a_teacher_tensor_recaptures_on_the_gpu():
    _deterministic()
    ctx = _ctx("cuda", batch=16)
    _both(ctx)
    for p in ctx.teacher.parameters():  # new storage: the old graph would read freed memory
        p.data = p.data * 0.5
    graph, eager = _both(ctx, seed=2)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert len(graphed.pair_cache(ctx.teacher)) == 1
    ctx.teacher = build("tiny").to("cuda").eval()  # another teacher: its own graph
    graph, eager = _both(ctx, seed=3)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)


@pytest.mark.cuda
def test_an_uneven_last_batch_gets_its_own_graph():
    _deterministic()
    ctx = _ctx("cuda", batch=16)
    _both(ctx)
    ctx.x, ctx.y = ctx.x[:5], ctx.y[:5]
    graph, eager = _both(ctx, seed=4)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert len(graphed.pair_cache(ctx.teacher)) == 2


@pytest.mark.cuda
def test_an_fp16_cast_teacher_under_bf16_autocast():
    """The engine's CIFAR-100 default: the teacher's weights in fp16 (CastTeacher, its forward outside
    autocast), the student under bf16 autocast; the input gradient runs back through both in the graph."""
    _deterministic()
    ctx = _ctx("cuda", batch=16)
    ctx.teacher = cast_teacher(freeze(build("tiny")), "fp16").to("cuda")
    graph, eager = _both(ctx, amp=torch.bfloat16)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert not torch.equal(graph, ctx.x)
