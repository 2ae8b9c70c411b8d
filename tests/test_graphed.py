"""The CUDA-graph attack loop's bookkeeping: which graph a call may replay, and how its buffers are laid out.

The cache and buffer logic is device-agnostic and tested on the CPU; capture and replay need a GPU.
"""

import gc
import threading

import pytest
import torch

from rslad_fast import fused_kl_pgd
from rslad_fast.attacks import graphed
from rslad_fast.attacks.pgd import random_start
from rslad_fast.models import build


class _Built:
    """A stand-in for a captured loop: counts how often the cache had to build one."""

    count = 0

    def __init__(self):
        type(self).count += 1


def _get(cache, model, key=("k",)):
    return cache.get(model, key, _Built)


# ---- the cache: per model, weak, invalidated when a tensor is replaced --------------------------------


def test_cache_reuses_a_loop_for_the_same_model_and_key():
    cache, model = graphed.GraphCache(), build("tiny")
    a = _get(cache, model)
    assert _get(cache, model) is a
    assert _get(cache, model, key=("other",)) is not a
    assert len(cache) == 2


def test_cache_drops_the_graphs_of_a_collected_model():
    cache = graphed.GraphCache()
    model = build("tiny")
    loop = _get(cache, model)
    ref = __import__("weakref").ref(loop)
    del model, loop
    gc.collect()
    assert len(cache) == 0 and ref() is None  # the loop (and on a GPU its memory pool) is freed


def test_a_new_model_never_inherits_a_dead_models_graph():
    cache = graphed.GraphCache()
    seen = set()
    for _ in range(20):  # CPython reuses ids of freed objects: id()-keyed caches hand out stale graphs
        model = build("tiny")
        seen.add(id(model))
        loop = _get(cache, model)
        assert isinstance(loop, _Built) and loop.count == _Built.count  # built fresh for this model
        del model, loop
        gc.collect()
    assert len(cache) == 0


def test_in_place_updates_keep_the_graph():
    cache, model = graphed.GraphCache(), build("tiny")
    loop = _get(cache, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()  # in place: the graph reads the new values where they live
    model.load_state_dict(build("tiny").state_dict())  # copy_ into the same storage
    assert _get(cache, model) is loop


@pytest.mark.parametrize("replace", ["channels_last", "double", "data", "buffer"])
def test_replacing_a_tensor_invalidates_the_models_graphs(replace):
    cache, model = graphed.GraphCache(), build("tiny")
    loop = _get(cache, model)
    _get(cache, model, key=("second",))
    if replace == "channels_last":
        model.to(memory_format=torch.channels_last)
    elif replace == "double":
        model.double()
    elif replace == "data":
        p = next(model.parameters())
        p.data = p.data.clone()
    else:
        name, buf = next((n, b) for n, b in model.named_buffers() if b.is_floating_point())
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, buf.clone())
    fresh = _get(cache, model)
    assert fresh is not loop
    assert len(cache) == 1  # the stale graphs are dropped, not kept beside the new one


# ---- the static buffers: the eager loop's layout and random numbers --------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_static_buffers_match_the_eager_loop(channels_last):
    x = torch.rand(4, 3, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(4, 10)
    buf = graphed.static_buffers(x, target, init_std=0.001)
    assert buf["noise"].is_contiguous()  # randn(out=) fills memory order: a channels_last buffer permutes it
    assert buf["x_nat"].stride() == x.stride()
    eager = random_start(x, "normal", 8 / 255, 0.001, torch.Generator().manual_seed(3))
    assert buf["x_adv"].stride() == eager.stride()
    buf["x_nat"].copy_(x)
    graphed.draw_noise(buf["noise"], torch.Generator().manual_seed(3))
    torch.add(buf["x_nat"], buf["noise"], alpha=0.001, out=buf["x_adv"])
    torch.testing.assert_close(buf["x_adv"], eager, rtol=0, atol=0)


def test_a_channels_last_noise_buffer_would_differ():
    """Why the noise buffer is contiguous: the trap the test above guards against is real."""
    x = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    wrong = torch.empty_like(x)
    graphed.draw_noise(wrong, torch.Generator().manual_seed(3))
    right = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(wrong, right)


# ---- on a GPU: capture under concurrent CUDA work, device guard, stale parameters -------------------------


def _setup(arch="tiny", batch=16, device="cuda"):
    """A fresh cache, deterministic cuDNN (replay == eager bitwise), a student, a batch and its targets."""
    graphed.clear_cache()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    student, teacher = build(arch).to(device), build(arch).to(device).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    with torch.no_grad():
        t = teacher(x)
    return student, x, t


def _eager_and_graph(student, x, t, seed=0, **kw):
    eager = fused_kl_pgd(student, x, t, cuda_graph=False, generator=torch.Generator(x.device).manual_seed(seed), **kw)
    graph = fused_kl_pgd(student, x, t, cuda_graph=True, generator=torch.Generator(x.device).manual_seed(seed), **kw)
    return eager, graph


@pytest.mark.cuda
def test_capture_while_another_thread_uses_cuda():
    student, x, t = _setup(batch=32)
    stop, errors = threading.Event(), []

    def busy():  # what DALI's prefetch threads do: allocate and copy on a stream of their own
        stream = torch.cuda.Stream()
        try:
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    host = torch.rand(256, 256).pin_memory()
                    dev = host.to("cuda", non_blocking=True)
                    (dev * 2).sum()
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        eager, graph = _eager_and_graph(student, x, t)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)


@pytest.mark.cuda
def test_replacing_parameters_recaptures_instead_of_reading_freed_memory():
    student, x, t = _setup()
    _eager_and_graph(student, x, t)
    student.load_state_dict(build("tiny").state_dict())  # in place: same graph, new values
    eager, graph = _eager_and_graph(student, x, t, seed=1)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    for p in student.parameters():  # new storage: the old graph would read freed memory
        p.data = p.data * 0.5
    eager, graph = _eager_and_graph(student, x, t, seed=2)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    student = student.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    eager, graph = _eager_and_graph(student, xc, t, seed=3)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)


@pytest.mark.cuda
def test_graph_under_the_callers_autocast_equals_eager_under_it():
    student, x, t = _setup("mnv2", batch=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, graph = _eager_and_graph(student, x, t)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_model_on_a_device_that_is_not_the_current_one():
    student, x, t = _setup(device="cuda:1")
    with torch.cuda.device(0):
        eager, graph = _eager_and_graph(student, x, t)
        assert torch.cuda.current_device() == 0
    assert graph.device == x.device
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert not torch.equal(graph, x)  # the graph really ran (an empty capture would return the start)


def test_the_loop_key_includes_the_backend_math_flags():
    """A graph captured under one TF32 / cuDNN setting is not replayed after the setting changes: the key
    differs, so the cache captures anew (issue 23, item 8)."""
    x, t = torch.zeros(2, 3, 4, 4), torch.zeros(2, 10)

    def key():
        return graphed.loop_key(x, t, eps=8 / 255, alpha=2 / 255, steps=10, init_std=0.001, amp_dtype=None)

    saved = graphed.backend_flags()
    try:
        base = key()
        assert key() == base  # deterministic
        for flip in (
            lambda: setattr(torch.backends.cudnn, "allow_tf32", not saved[0]),
            lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", not saved[1]),
            lambda: setattr(torch.backends.cudnn, "benchmark", not saved[3]),
        ):
            flip()
            assert key() != base
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[0], saved[1]
            torch.backends.cudnn.benchmark = saved[3]
            assert key() == base
        cache, model, built = graphed.GraphCache(), build("tiny"), []
        cache.get(model, key(), lambda: built.append(1) or "loop A")
        torch.backends.cudnn.allow_tf32 = not saved[0]
        assert cache.get(model, key(), lambda: built.append(1) or "loop B") == "loop B" and len(built) == 2
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[0], saved[1]
        torch.backends.cudnn.benchmark = saved[3]
