"""AdaAD (rslad_fast/methods/adaad.py) against a transcription of the official code, boyellow/AdaAD:
`AT_helper.py` `adaad_inner_loss` (the attack, with the teacher inside it) and `main.py`'s AdaAD branch (the
loss), in float64 on the `tiny` model; its defaults against the cited values; and `train --method adaad` end
to end on the fake CIFAR-10 with the quick preset, resumed bitwise.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rslad_fast import methods, models, train
from rslad_fast.engine import create_run_dir, prepare, run
from rslad_fast.engine.step import train_step
from rslad_fast.engine.teacher import cast_teacher, freeze
from rslad_fast.errors import UserError
from rslad_fast.methods import AdaAD, Context, get
from rslad_fast.methods import adaad as adaad_module
from rslad_fast.models.fold import FoldedCopy

B, C = 8, 10
pytestmark = pytest.mark.usefixtures("one_thread")  # the test machine's cores are shared


def tiny(seed, num_classes=C):
    torch.manual_seed(seed)
    return models.build("tiny", num_classes)


@pytest.fixture(scope="module")
def setup64():
    """Student, teacher (another init), a batch with pixels on the box's faces, a fixed x', in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 32, 32, generator=g, dtype=torch.float64)
    x[0, 0, :4] = 0.0
    x[1, 1, :4] = 1.0
    y = torch.randint(0, C, (B,), generator=g)
    x_adv = (x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return tiny(0).double(), tiny(1).double(), x, y, x_adv


def context(student, teacher, x, y, seed=0):
    with torch.no_grad():
        t_logits = copy.deepcopy(teacher).eval()(x)
    return Context(
        student=student,
        x=x,
        y=y,
        teacher=teacher,
        teacher_logits=t_logits,
        generator=torch.Generator().manual_seed(seed),
    )


# ---- the official formulas, transcribed (torch.nn / F only) ---------------------------------------------


def official_inner_loss(model, teacher_model, x_natural, generator, step_size, steps, epsilon):
    """AT_helper.py adaad_inner_loss (BN_eval=True, random_init=True, clip 0..1), its randn drawn from
    `generator` (the official code: the global CUDA stream)."""
    criterion_kl = nn.KLDivLoss(reduction="none")
    model.eval()
    teacher_model.eval()
    noise = torch.randn(x_natural.shape, generator=generator, dtype=x_natural.dtype)
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_model(x_adv), dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def official_inner_objective(model, teacher_model, x_adv):
    """The scalar adaad_inner_loss climbs, at x_adv (both models as they are)."""
    loss_kl = nn.KLDivLoss(reduction="none")(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_model(x_adv), dim=1))
    return torch.sum(loss_kl)


def official_loss(net, teacher_net, inputs, adv_inputs, alpha, dataset):
    """main.py's AdaAD branch after the attack (lines 330-353): S(x), S(x') in train mode, T(x), T(x') in eval
    mode under no_grad, KLDivLoss() (mean over B*C) on CIFAR-10, (1/B) * sum on CIFAR-100."""
    net.train()
    ori_outputs = net(inputs)
    adv_outputs = net(adv_inputs)
    with torch.no_grad():
        teacher_net.eval()
        t_ori_outputs = teacher_net(inputs)
        t_adv_outputs = teacher_net(adv_inputs)
    if dataset == "CIFAR10":
        kl_loss1 = nn.KLDivLoss()(F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1))
        kl_loss2 = nn.KLDivLoss()(F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1))
    else:
        kl_loss1 = (1 / len(adv_outputs)) * torch.sum(
            nn.KLDivLoss(reduction="none")(F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1))
        )
        kl_loss2 = (1 / len(adv_outputs)) * torch.sum(
            nn.KLDivLoss(reduction="none")(F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1))
        )
    return alpha * kl_loss1 + (1 - alpha) * kl_loss2


# ---- the attack ------------------------------------------------------------------------------------------


def test_inner_objective_and_its_input_gradient_are_the_official_ones(setup64):
    """The objective of the pair (S(x'), T(x')) equals sum(KLDivLoss(none)(...)), and its gradient w.r.t. x'
    (through the student AND the teacher, via the fused softmax_kl's teacher gradient) equals autograd's
    through the official formula; without the teacher's part the gradient would differ."""
    student, teacher, _, _, x_adv = setup64
    S, T = copy.deepcopy(student).eval(), copy.deepcopy(teacher).eval()
    pair = adaad_module.StudentTeacher(S, T)

    xa = x_adv.clone().requires_grad_(True)
    ours = AdaAD().objective(None)(pair(xa))
    (g_ours,) = torch.autograd.grad(ours, xa)
    xb = x_adv.clone().requires_grad_(True)
    expected = official_inner_objective(S, T, xb)
    (g_official,) = torch.autograd.grad(expected, xb)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12), (ours.item(), expected.item())
    assert torch.allclose(g_ours, g_official, rtol=1e-8, atol=1e-14)

    xc = x_adv.clone().requires_grad_(True)
    detached = official_inner_objective(S, lambda z: T(z).detach(), xc)  # the teacher as a constant
    (g_detached,) = torch.autograd.grad(detached, xc)
    assert not torch.allclose(g_official, g_detached, rtol=1e-3, atol=1e-8)  # the teacher's part matters


@pytest.mark.parametrize("overrides", [{}, {"steps": 3, "eps": 16 / 255, "step_size": 4 / 255}])
def test_attack_equals_the_official_adaad_inner_loss(setup64, overrides):
    """The whole attack from the same random start: x' equals adaad_inner_loss's, both models in eval mode
    during it, every module's mode given back afterwards."""
    student, teacher, x, y, _ = setup64
    method = AdaAD(**overrides)
    S, T = copy.deepcopy(student).train(), copy.deepcopy(teacher)
    S.bn2.eval()  # a mixed state, to see it restored module by module
    T.train()  # the attack must put the teacher in eval mode itself and give its mode back
    before = [m.training for m in S.modules()], [m.training for m in T.modules()]
    ctx = context(S, T, x, y, seed=4)
    modes = []
    hooks = [
        S.register_forward_pre_hook(lambda m, inp: modes.append(("S", m.bn1.training, torch.is_grad_enabled()))),
        T.register_forward_pre_hook(lambda m, inp: modes.append(("T", m.bn1.training, torch.is_grad_enabled()))),
    ]
    try:
        ours = method.attack(ctx)
    finally:
        for h in hooks:
            h.remove()
    assert modes == [("S", False, True), ("T", False, True)] * method.steps  # both eval, both with grad
    assert ([m.training for m in S.modules()], [m.training for m in T.modules()]) == before

    expected = official_inner_loss(
        copy.deepcopy(student),
        copy.deepcopy(teacher),
        x,
        torch.Generator().manual_seed(4),
        step_size=method.step_size,
        steps=method.steps,
        epsilon=method.eps,
    )
    assert not ours.requires_grad and ours.dtype == torch.float64
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max().item()
    assert (ours - x).abs().max() <= method.eps + 1e-12 and ours.min() >= 0 and ours.max() <= 1

    obj = {k: method.attack_objective(ctx, v).item() for k, v in (("adv", ours), ("nat", x))}
    assert obj["adv"] > obj["nat"]


def test_attack_goes_through_the_pgd_engine(setup64, monkeypatch):
    student, teacher, x, y, _ = setup64
    real, seen = adaad_module.pgd, []

    def spy(model, x_nat, objective, **kwargs):
        seen.append((model, objective, kwargs))
        return real(model, x_nat, objective, **kwargs)

    monkeypatch.setattr(adaad_module, "pgd", spy)
    method = AdaAD()
    ctx = context(copy.deepcopy(student), teacher, x, y)
    method.attack(ctx)
    ((model, objective, kwargs),) = seen
    assert isinstance(model, adaad_module.StudentTeacher) and model.student is ctx.attack_model
    assert model.teacher is ctx.teacher and objective is adaad_module.adaad_objective
    assert kwargs == dict(
        eps=8 / 255, alpha=2 / 255, steps=10, start="normal", mode="eval", generator=ctx.generator, init_std=0.001
    )


def test_attack_needs_the_teacher_itself(setup64):
    student, _, x, y, _ = setup64
    ctx = Context(student=student, x=x, y=y, teacher=None, teacher_logits=torch.zeros(B, C, dtype=x.dtype))
    with pytest.raises(ValueError, match="ctx.teacher"):
        AdaAD(steps=1).attack(ctx)


# ---- the loss --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # the official KLDivLoss()
@pytest.mark.parametrize(
    "overrides, dataset",
    [({}, "CIFAR10"), ({"alpha": 0.6}, "CIFAR10"), ({"reduction": "batchmean"}, "CIFAR100"),
     ({"alpha": 0.3, "reduction": "batchmean"}, "CIFAR100")],
)  # fmt: skip
def test_loss_matches_main_py(setup64, overrides, dataset):
    """loss_at(x') equals main.py's AdaAD loss: value, every parameter gradient, and BatchNorm's running
    statistics (S(x) then S(x'), in train mode); the teacher runs on x' in eval mode and gets its mode back."""
    student, teacher, x, y, x_adv = setup64
    method = AdaAD(**overrides)
    ours_S, official_S = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    T = copy.deepcopy(teacher).train()
    ctx = context(ours_S, T, x, y)
    seen = []
    hook = T.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.is_grad_enabled())))
    try:
        loss = method.loss_at(ctx, x_adv)
    finally:
        hook.remove()
    assert seen == [(False, False)] and T.training  # T(x') once (T(x) is ctx.teacher_logits)
    loss.backward()
    expected = official_loss(official_S, copy.deepcopy(teacher), x, x_adv, method.alpha, dataset)
    expected.backward()
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-14), (loss.item(), expected.item())
    for (name, p1), p2 in zip(ours_S.named_parameters(), official_S.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-8, atol=1e-14), name
    for (name, b1), b2 in zip(ours_S.named_buffers(), official_S.buffers()):
        assert torch.allclose(b1.double(), b2.double(), rtol=1e-12, atol=1e-14), name  # same order of forwards
    assert float(ctx.stats["loss"]) == pytest.approx(loss.item())
    assert {"loss_adv", "loss_nat", "acc_nat", "acc_adv"} <= set(ctx.stats)


def test_loss_uses_the_teacher_on_x_prime_not_the_cached_natural_logits(setup64):
    """T(x') comes from ctx.teacher, never from ctx.teacher_logits (the only thing the cache serves): a wrong
    T(x) changes the natural term only, so with the default alpha 1 the loss does not move."""
    student, teacher, x, y, x_adv = setup64
    method = AdaAD()
    ctx = context(copy.deepcopy(student).train(), teacher, x, y)
    good = method.loss_at(ctx, x_adv).item()
    ctx.teacher_logits = torch.randn(B, C, dtype=x.dtype)
    assert method.loss_at(ctx, x_adv).item() == pytest.approx(good, rel=1e-12)
    assert AdaAD.TEACHER_CACHE_AUTO is False and AdaAD.needs_teacher


@pytest.mark.parametrize("teacher_dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_engine_step_with_folded_attack_copy_cast_teacher_and_autocast(teacher_dtype, amp):
    """One engine.step.train_step: the attack through the BN-folded copy of the student and a teacher in
    fp32, bf16 or fp16 weights (CastTeacher), under bf16 autocast or none: a finite float32 loss, a step."""
    S = tiny(0).to(memory_format=torch.channels_last)
    T = cast_teacher(freeze(tiny(1)), teacher_dtype)
    before = [p.detach().clone() for p in S.parameters()]
    opt = torch.optim.SGD(S.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, C, (8,))
    loss, ctx = train_step(
        S, AdaAD(steps=2), opt, x, y, teacher=T, amp_dtype=amp, generator=torch.Generator().manual_seed(0),
        fold=FoldedCopy(S),
    )  # fmt: skip
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and float(ctx.stats["loss_adv"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, S.parameters()))


def test_sgd_steps_decrease_the_loss(setup64):
    student, teacher, x, y, _ = setup64
    method = AdaAD(steps=2)
    S = copy.deepcopy(student).float().train()
    T = copy.deepcopy(teacher).float()
    opt = torch.optim.SGD(S.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = method.loss(context(S, T, x.float(), y, seed=11))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# ---- defaults and their sources --------------------------------------------------------------------------


def test_defaults_are_the_cited_official_values():
    assert get("adaad") is AdaAD and get("AdaAD") is AdaAD and "adaad" in methods.names()
    d = AdaAD().hparams()
    # README.md:58-60 (the paper's AdaAD command) `--epsilon 8 --num_steps 10 --step_size 2`, /255 in
    # main.py:327-328; AT_helper.py:27 `0.001 * torch.randn`; main.py:41 `--AdaAD_alpha 1.0`
    assert d == dict(
        eps=8 / 255, step_size=2 / 255, steps=10, init_std=0.001, alpha=1.0, reduction="mean", cuda_graph="auto"
    )  # cuda_graph: an implementation switch, RSLAD's
    assert "README.md:58" in AdaAD.HPARAMS["eps"].help and "AT_helper.py:27" in AdaAD.HPARAMS["init_std"].help
    assert "main.py:41" in AdaAD.HPARAMS["alpha"].help and "main.py:342" in AdaAD.HPARAMS["reduction"].help
    # main.py:58-64 and lr_decay (113-128): 200 epochs, bs 128, SGD lr 0.1 momentum 0.9 wd 5e-4, x0.1 at 100, 150
    s = AdaAD.SCHEDULE
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay) == (200, 128, 0.1, 0.9, 5e-4)
    assert (s.milestones, s.gamma, AdaAD().milestones()) == ((100, 150), 0.1, (100, 150))
    assert [AdaAD().lr_at(e) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert "main.py:58-64" in s.source
    # main.py:347-351: CIFAR-100's per-image sum / B
    assert AdaAD.official_setting("resnet18", "cifar100")[1]["reduction"] == "batchmean"
    assert AdaAD.official_setting("resnet18", "cifar10")[1]["reduction"] == "mean"
    assert AdaAD().per_image_factor(10) == 10 and AdaAD(reduction="batchmean").per_image_factor(100) == 1
    assert (AdaAD.attack_mode, AdaAD.attack_start, AdaAD.TEACHER_CACHE_AUTO) == ("eval", "normal", False)
    for key in ("AT_helper.py", "adaad_inner_loss", "main.py:326-353", "README.md:51-66"):
        assert key in adaad_module.__doc__, key


@pytest.mark.parametrize("overrides", [{"reduction": "sum"}, {"alpha": 1.5}, {"eps": -1}, {"steps": 2.5}])
def test_bad_hparams_are_user_errors(overrides):
    with pytest.raises(UserError):
        AdaAD(**overrides)


def test_hparams_from_strings_are_coerced():
    m = AdaAD(alpha="0.5", reduction=" BatchMean ", steps="3")
    assert (m.alpha, m.reduction, m.steps) == (0.5, "batchmean", 3)


def test_command_line_resolution():
    parse = train.build_parser().parse_args
    cfg = train.resolve_config(parse(["--method", "adaad", "--student", "tiny", "--teacher", "t.pt"]))
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.milestones, cfg.batch_size) == (200, 0.1, 5e-4, [100, 150], 128)
    assert cfg.hparams == AdaAD().hparams()
    cfg = train.resolve_config(
        parse(["--method", "adaad", "--student", "tiny", "--teacher", "t.pt", "--dataset", "cifar100"])
    )
    assert cfg.hparams["reduction"] == "batchmean" and cfg.lr == 0.1  # per image: no quick-preset factor either
    cfg = train.resolve_config(
        parse(
            [
                "--method",
                "adaad",
                "--student",
                "tiny",
                "--teacher",
                "t.pt",
                "--eps",
                "16/255",
                "--reduction",
                "batchmean",
            ]
        )
    )
    assert cfg.hparams["eps"] == pytest.approx(16 / 255) and cfg.hparams["reduction"] == "batchmean"


# ---- end to end ------------------------------------------------------------------------------------------

COMMON = ["--student", "tiny", "--threads", "1", "--eval-n", "32", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=32, seed=2)


@pytest.fixture(scope="module")
def teacher_ckpt(data, natural_teacher):
    return natural_teacher(data, "--epochs", "2", *COMMON)


def _args(data, out, teacher_ckpt):
    return [
        "--method", "adaad", "--preset", "quick", "--teacher", str(teacher_ckpt), "--teacher-arch", "tiny",
        "--train-n", "256", "--epochs", "2", "--data", str(data), "--out", str(out), *COMMON,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(data, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("adaad") / "run"
    assert train.main(_args(data, out, teacher_ckpt)) == 0
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_quick_end_to_end(straight):
    cfg = json.loads((straight / "config.json").read_text())
    quick = train.PRESETS["quick"]
    assert cfg["method"] == "adaad" and cfg["preset"] == "quick" and cfg["teacher"]["arch"] == "tiny"
    assert cfg["hparams"]["steps"] == quick.attack_steps  # 10 x 2/255 -> k x 20/k /255
    assert cfg["hparams"]["step_size"] == pytest.approx(10 * 2 / 255 / quick.attack_steps)
    # a per-element mean (KLDivLoss() over B*C on CIFAR-10): the quick preset's lr x C, weight decay / C
    assert (cfg["lr"], cfg["weight_decay"]) == (pytest.approx(1.0), pytest.approx(5e-5))
    recs = _records(straight)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert all(k in r for k in ("train_loss", "train_loss_adv", "train_loss_nat", "clean_acc", "pgd20_acc"))
        assert 0.0 < r["train_loss"] < float("inf") and 0.0 <= r["pgd20_acc"] <= r["clean_acc"] <= 1.0


def test_resume_is_bitwise_identical(straight, data, teacher_ckpt, tmp_path):
    resumed = tmp_path / "resumed"
    args = _args(data, resumed, teacher_ckpt)
    cfg = train.resolve_config(train.build_parser().parse_args(args))
    prep = prepare(cfg)
    create_run_dir(resumed, cfg)
    run(prep, resumed, progress=False, stop_after=1)  # as if killed right after epoch 1's checkpoint
    assert train.main(["--resume", str(resumed), "--no-progress"]) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    timing = ("epoch_time_s", "eval_time_s", "images_per_s", "teacher_cache_hit_rate", "teacher_forwards_saved")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]  # noqa: E731
    assert strip(_records(straight)) == strip(_records(resumed))
