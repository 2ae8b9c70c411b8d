"""The fast path's switches: bf16 autocast, channels_last, the inference-mode teacher, and the CUDA-graph
inner loop (replay == eager, on a GPU only).

CPU tests use the 5k-parameter `tiny` model; this CPU has no native bf16, so bf16 runs here are slow but
correct, which is all they need to be.
"""

import json

import pytest
import torch

from rslad_fast import fused_kl_pgd, methods, train
from rslad_fast.engine.step import AMP_DTYPES, teacher_logits, train_step
from rslad_fast.models import build


def _pair(seed=0, arch="tiny"):
    torch.manual_seed(seed)
    student, teacher = build(arch), build(arch).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _batch(n=16, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


# ---- the teacher: inference mode, float32 logits usable as autograd targets ----------------------------


def test_teacher_runs_in_inference_mode_and_its_logits_are_plain_fp32():
    _, teacher = _pair()
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((torch.is_inference_mode_enabled(), o.dtype)))
    x, _ = _batch()
    logits = teacher_logits(teacher, x, torch.bfloat16)
    assert seen == [(True, torch.bfloat16)]  # autocast reached the teacher, under inference_mode
    assert logits.dtype == torch.float32 and not logits.is_inference() and not logits.requires_grad
    # usable where TRADES-style losses save it for backward
    s = torch.randn(16, 10, requires_grad=True)
    torch.nn.functional.kl_div(s.log_softmax(1), logits.softmax(1), reduction="sum").backward()
    assert torch.isfinite(s.grad).all()


# ---- bf16 autocast: low-precision passes, fp32 master weights ---------------------------------------------


@pytest.mark.parametrize("method", ["rslad", "trades"])
def test_bf16_train_step_keeps_fp32_master_weights(method):
    student, teacher = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    dtypes = []
    first_conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    m = methods.get(method)(steps=2)
    x, y = _batch()
    loss, ctx = train_step(
        student,
        m,
        opt,
        x,
        y,
        teacher=teacher if m.needs_teacher else None,
        amp_dtype=torch.bfloat16,
        generator=torch.Generator().manual_seed(0),
    )
    assert dtypes and set(dtypes) == {torch.bfloat16}  # attack and training forwards all autocast
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(p.grad.dtype == torch.float32 for p in student.parameters() if p.grad is not None)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_bf16_and_fp32_steps_agree_to_bf16_precision():
    x, y = _batch()
    losses = {}
    for amp in ("fp32", "bf16"):
        student, teacher = _pair()
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        loss, _ = train_step(
            student,
            methods.get("rslad")(steps=2),
            opt,
            x,
            y,
            teacher=teacher,
            amp_dtype=AMP_DTYPES[amp],
            generator=torch.Generator().manual_seed(0),
        )
        losses[amp] = float(loss)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05), losses


# ---- channels_last: the same step, another memory layout -------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", "mnv2"])
def test_channels_last_step_matches_the_contiguous_step(arch):
    x, y = _batch(8)
    out = {}
    for cl in (False, True):
        student, teacher = _pair(arch=arch)
        xx = x
        if cl:
            student = student.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        loss, _ = train_step(
            student,
            methods.get("rslad")(steps=2),
            opt,
            xx,
            y,
            teacher=teacher,
            generator=torch.Generator().manual_seed(0),
        )
        out[cl] = (float(loss), [p.detach().clone().contiguous() for p in student.parameters()])
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-4)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ---- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=128, n_test=32, seed=0)


def test_cli_trains_with_bf16_and_channels_last(data, tmp_path, monkeypatch):
    from rslad_fast.engine import loop

    seen = []
    original = loop.train_step

    def spy(student, method, optimizer, x, y, **kw):
        seen.append(
            (
                kw["amp_dtype"],
                x.is_contiguous(memory_format=torch.channels_last),
                next(p for p in student.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last),
            )
        )
        return original(student, method, optimizer, x, y, **kw)

    monkeypatch.setattr(loop, "train_step", spy)
    run = tmp_path / "run"
    assert (
        train.main(
            [
                "--method",
                "trades",
                "--student",
                "tiny",
                "--data",
                str(data),
                "--out",
                str(run),
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--eval-n",
                "32",
                "--steps",
                "2",
                "--threads",
                "1",
                "--amp",
                "bf16",
                "--channels-last",
                "--no-progress",
            ]
        )
        == 0
    )
    assert seen and all(s == (torch.bfloat16, True, True) for s in seen)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["amp"] == "bf16" and cfg["channels_last"] is True
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in recs)
    # the checkpoint loads into a plain (contiguous) model
    build("tiny").load_state_dict(torch.load(run / "last.pt", weights_only=True)["model"])


def test_defaults_fp32_and_quick_preset_switches_channels_last_on(data, tmp_path):
    from rslad_fast.engine.config import Config

    args = train.build_parser().parse_args(["--method", "natural", "--student", "tiny", "--data", str(data)])
    cfg = train.resolve_config(args)
    assert (cfg.amp, cfg.channels_last) == ("fp32", False)
    args = train.build_parser().parse_args(
        ["--preset", "quick", "--student", "tiny", "--data", str(data), "--no-channels-last", "--teacher-arch", "tiny"]
    )
    cfg = train.resolve_config(args)
    assert cfg.channels_last is False and cfg.teacher_run["channels_last"] is False
    assert Config.from_dict(cfg.to_dict()) == cfg
    args = train.build_parser().parse_args(["--preset", "quick", "--student", "tiny", "--data", str(data)])
    assert train.resolve_config(args).channels_last is True


def test_bad_amp_and_resume_overrides_fail_cleanly(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--amp", "fp8", "--data", str(data)])
    assert e.value.code == 2 and "--amp" in capsys.readouterr().err
    run = tmp_path / "r"
    assert (
        train.main(
            [
                "--method",
                "natural",
                "--student",
                "tiny",
                "--data",
                str(data),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--eval-n",
                "8",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--no-channels-last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--channels-last" in err[0]


# ---- CUDA graphs: replay computes what eager computes (GPU only) ------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["tiny", "mnv2"])
@pytest.mark.parametrize("batch", [128, 37])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_replay_equals_eager(arch, batch, channels_last):
    from rslad_fast.attacks import graphed

    graphed.clear_cache()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    student, teacher = _pair(arch=arch)
    student, teacher = student.cuda(), teacher.cuda()
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for seed in range(3):  # replays with new inputs, and new weights in between (in-place optimizer steps)
        x, _ = _batch(batch, seed=seed, device="cuda")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t = teacher(x)
        student.train()
        eager = fused_kl_pgd(student, x, t, cuda_graph=False, generator=torch.Generator("cuda").manual_seed(seed))
        graph = fused_kl_pgd(student, x, t, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(seed))
        assert student.training  # modes restored
        assert all(p.grad is None for p in student.parameters())  # no parameter gradient accumulated
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)
        assert (graph - x).abs().max() <= 8 / 255 + 1e-6
        student(x).logsumexp(1).mean().backward()  # a training step between batches
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.cuda
def test_cuda_graph_bf16_replay_equals_eager_bf16():
    from rslad_fast.attacks import graphed

    graphed.clear_cache()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    student, teacher = _pair(arch="mnv2")
    student, teacher = student.cuda(), teacher.cuda()
    x, _ = _batch(64, device="cuda")
    with torch.no_grad():
        t = teacher(x)
    kw = dict(amp_dtype=torch.bfloat16)
    eager = fused_kl_pgd(student, x, t, cuda_graph=False, generator=torch.Generator("cuda").manual_seed(0), **kw)
    graph = fused_kl_pgd(student, x, t, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(0), **kw)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
