"""MTARD (rslad_fast/methods/mtard.py) against a transcription of the official code, zhaoshiji123/MTARD:
`mtard/mtard_loss.py` `mtard_inner_loss_ce` (the attack) and `mtard/mtard_resnet18_cifar10.py`'s training step
(the two teachers, `kl_loss`, the adaptive weights), in float64 on the `tiny` model over several steps; the
weight update against its hand-written formula; its defaults against the cited values; the command line's
one-line errors; and `train --method mtard` end to end with two generated teacher files, resumed bitwise with
its adaptive weights restored from last.pt.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from rslad_fast import methods, models, train
from rslad_fast.engine import create_run_dir, prepare, run
from rslad_fast.engine.build import build_parts, random_teacher
from rslad_fast.engine.checkpoint import load_checkpoint, restore
from rslad_fast.engine.step import train_step
from rslad_fast.engine.teacher import cast_teacher, freeze
from rslad_fast.engine.teacher_cache import TeacherCache
from rslad_fast.errors import UserError
from rslad_fast.methods import MTARD, Context, get
from rslad_fast.methods import mtard as mtard_module
from rslad_fast.methods.mtard import AdaptiveWeights, TwoTeachers
from rslad_fast.models.fold import FoldedCopy

B, C = 8, 10
pytestmark = pytest.mark.usefixtures("one_thread")  # the test machine's cores are shared


def tiny(seed, num_classes=C):
    torch.manual_seed(seed)
    return models.build("tiny", num_classes)


@pytest.fixture(scope="module")
def setup64():
    """Student, adversarial teacher, natural teacher (three inits), a batch with pixels on the box's faces, in
    float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 32, 32, generator=g, dtype=torch.float64)
    x[0, 0, :4] = 0.0
    x[1, 1, :4] = 1.0
    y = torch.randint(0, C, (B,), generator=g)
    return tiny(0).double(), tiny(1).double(), tiny(2).double(), x, y


def context(student, pair, x, y, seed=0, epoch=0):
    with torch.no_grad():
        t_nat = copy.deepcopy(pair.nat).eval()(x)  # the engine's T(x): the pair's forward, the natural teacher
    return Context(
        student=student,
        x=x,
        y=y,
        teacher=pair,
        teacher_logits=t_nat,
        epoch=epoch,
        generator=torch.Generator().manual_seed(seed),
    )


# ---- the official definitions, transcribed (torch / F only) ---------------------------------------------


def official_inner_loss_ce(model, x_natural, y, generator, step_size, epsilon, perturb_steps):
    """mtard_loss.py:27-53 mtard_inner_loss_ce's attack, its randn drawn from `generator` (the official code:
    the global CUDA stream)."""
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, generator=generator, dtype=x_natural.dtype)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = torch.nn.CrossEntropyLoss()(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def kl_loss(a, b):  # mtard_resnet18_cifar10.py:51-53
    return -a * b + torch.log(b + 1e-5) * b


class OfficialStep:
    """mtard_resnet18_cifar10.py's training step after the attack (lines 72-100), Python floats for the
    weights and the first losses as there (lines 44-49); `scale` 10 is the CIFAR-100 file's lines 79-80."""

    def __init__(self, weight_learn_rate=0.025, bert=1, scale=1):
        self.weight = {"adv_loss": 1 / 2.0, "nat_loss": 1 / 2.0}
        self.init_loss_nat = self.init_loss_adv = None
        self.weight_learn_rate, self.bert, self.scale = weight_learn_rate, bert, scale

    def __call__(self, student, teacher, teacher_nat, x, y, x_adv):
        with torch.no_grad():
            teacher_nat_logits = teacher_nat(x)
        student.train()
        student_adv_logits = student(x_adv)  # mtard_loss.py:55
        with torch.no_grad():
            teacher_adv_logits = teacher(x_adv)
        student.train()
        student_nat_logits = student(x)
        kl_Loss1 = kl_loss(F.log_softmax(student_adv_logits, dim=1), F.softmax(teacher_adv_logits.detach(), dim=1))
        kl_Loss2 = kl_loss(F.log_softmax(student_nat_logits, dim=1), F.softmax(teacher_nat_logits.detach(), dim=1))
        kl_Loss1 = self.scale * torch.mean(kl_Loss1)
        kl_Loss2 = self.scale * torch.mean(kl_Loss2)
        if self.init_loss_nat is None:
            self.init_loss_nat = kl_Loss2.item()
        if self.init_loss_adv is None:
            self.init_loss_adv = kl_Loss1.item()
        lhat_adv = kl_Loss1.item() / self.init_loss_adv
        lhat_nat = kl_Loss2.item() / self.init_loss_nat
        inv_rate_adv = lhat_adv**self.bert
        inv_rate_nat = lhat_nat**self.bert
        w, lr = self.weight, self.weight_learn_rate
        w["nat_loss"] = w["nat_loss"] - lr * (w["nat_loss"] - inv_rate_nat / (inv_rate_adv + inv_rate_nat))
        w["adv_loss"] = 1 - w["nat_loss"]
        return w["adv_loss"] * kl_Loss1 + w["nat_loss"] * kl_Loss2, kl_Loss1, kl_Loss2


# ---- the attack ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"steps": 3, "eps": 16 / 255, "step_size": 4 / 255}])
def test_attack_equals_the_official_mtard_inner_loss_ce(setup64, overrides):
    """From the same random start, x' equals mtard_inner_loss_ce's: CE on the labels, the student in eval
    mode with grad, no teacher inside, every module's mode given back."""
    student, adv, nat, x, y = setup64
    method = MTARD(**overrides)
    S = copy.deepcopy(student).train()
    S.bn2.eval()  # a mixed state, to see it restored module by module
    before = [m.training for m in S.modules()]
    pair = TwoTeachers(copy.deepcopy(adv), copy.deepcopy(nat))
    ctx = context(S, pair, x, y, seed=4)
    seen = []
    hooks = [S.register_forward_pre_hook(lambda m, inp: seen.append(("S", m.bn1.training, torch.is_grad_enabled())))]
    hooks += [t.register_forward_pre_hook(lambda m, inp: seen.append(("T",))) for t in (pair.adv, pair.nat)]
    try:
        ours = method.attack(ctx)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [("S", False, True)] * method.steps
    assert [m.training for m in S.modules()] == before
    expected = official_inner_loss_ce(
        copy.deepcopy(student), x, y, torch.Generator().manual_seed(4), method.step_size, method.eps, method.steps
    )
    assert not ours.requires_grad and ours.dtype == torch.float64
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max().item()
    assert (ours - x).abs().max() <= method.eps + 1e-12 and ours.min() >= 0 and ours.max() <= 1
    obj = {k: method.attack_objective(ctx, v).item() for k, v in (("adv", ours), ("nat", x))}
    assert obj["adv"] > obj["nat"]
    assert obj["adv"] == pytest.approx(F.cross_entropy(copy.deepcopy(student).eval()(ours), y).item(), rel=1e-12)


def test_attack_goes_through_the_pgd_engine(setup64, monkeypatch):
    student, adv, nat, x, y = setup64
    real, seen = mtard_module.pgd, []

    def spy(model, x_nat, objective, **kwargs):
        seen.append((model, kwargs))
        return real(model, x_nat, objective, **kwargs)

    monkeypatch.setattr(mtard_module, "pgd", spy)
    ctx = context(copy.deepcopy(student), TwoTeachers(adv, nat), x, y)
    MTARD().attack(ctx)
    ((model, kwargs),) = seen
    assert model is ctx.attack_model
    assert kwargs == dict(
        eps=8 / 255, alpha=2 / 255, steps=10, start="normal", mode="eval", generator=ctx.generator, init_std=0.001
    )


# ---- the loss and the adaptive weights --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, scale", [({}, 1), ({"kl_scale": 10.0}, 10), ({"weight_lr": 0.3, "weight_beta": 2.0}, 1)]
)
def test_steps_match_the_official_training_step(setup64, overrides, scale):
    """Four SGD steps, each with its own x': the loss value, both terms, every parameter gradient, BatchNorm's
    running statistics (S(x') then S(x)) and the adaptive weights equal the official step's (which reads the
    weights before this step's total, from the first step's losses)."""
    student, adv, nat, x, y = setup64
    method = MTARD(**overrides)
    official = OfficialStep(weight_learn_rate=method.weight_lr, bert=method.weight_beta, scale=scale)
    ours_S, off_S = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    pair = TwoTeachers(copy.deepcopy(adv).train(), copy.deepcopy(nat).eval())  # the loss puts T_adv in eval mode
    opt_a = torch.optim.SGD(ours_S.parameters(), lr=0.5, momentum=0.9)
    opt_b = torch.optim.SGD(off_S.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    seen = []
    hook = pair.adv.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.is_grad_enabled())))
    for step in range(4):
        x_adv = (x + 0.03 * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)
        ctx = context(ours_S, pair, x, y)
        seen.clear()
        loss = method.loss_at(ctx, x_adv)
        assert seen == [(False, False)] and pair.adv.training  # T_adv(x') once, eval mode, mode given back
        expected, kl1, kl2 = official(off_S, adv.eval(), nat.eval(), x, y, x_adv)
        for opt, value in ((opt_a, loss), (opt_b, expected)):
            opt.zero_grad()
            value.backward()
        assert loss.dtype == torch.float64
        assert torch.allclose(loss, expected, rtol=1e-12, atol=0), (step, loss.item(), expected.item())
        assert float(ctx.stats["loss_adv"]) == pytest.approx(kl1.item(), rel=1e-12)
        assert float(ctx.stats["loss_nat"]) == pytest.approx(kl2.item(), rel=1e-12)
        assert float(ctx.stats["weight_nat"]) == pytest.approx(official.weight["nat_loss"], rel=1e-12, abs=1e-15)
        assert float(ctx.stats["weight_adv"]) == pytest.approx(official.weight["adv_loss"], rel=1e-12, abs=1e-15)
        for (name, p1), p2 in zip(ours_S.named_parameters(), off_S.parameters()):
            assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-14), (step, name)
        for (name, b1), b2 in zip(ours_S.named_buffers(), off_S.buffers()):
            assert torch.allclose(b1.double(), b2.double(), rtol=1e-10, atol=1e-13), (step, name)
        opt_a.step()
        opt_b.step()
    hook.remove()
    assert official.weight["nat_loss"] != 0.5  # the weights moved: the comparison saw the update at work


def test_the_1e5_of_kl_loss_is_in_the_values_not_in_the_gradient(setup64):
    """mtard_kl = mean(kl_loss(log_softmax(S), softmax(T))) with the official log(b + 1e-5), whose constant
    moves the value (which the weights read) and not the gradient (the fused softmax_kl's)."""
    student, adv, _, x, _ = setup64
    s = student.eval()(x).detach().requires_grad_(True)
    t = 3 * adv.eval()(x).detach()  # sharper targets: some probabilities near 1e-5
    ours = mtard_module.mtard_kl(s, t)
    (g_ours,) = torch.autograd.grad(ours, s)
    s2 = s.detach().clone().requires_grad_(True)
    expected = torch.mean(kl_loss(F.log_softmax(s2, dim=1), F.softmax(t, dim=1)))
    (g_expected,) = torch.autograd.grad(expected, s2)
    assert torch.allclose(ours, expected, rtol=1e-13, atol=0)
    assert torch.allclose(g_ours, g_expected, rtol=1e-10, atol=1e-16)
    plain = (F.kl_div(F.log_softmax(s2, dim=1), F.softmax(t, dim=1), reduction="sum") / s2.numel()).item()
    assert abs(plain - ours.item()) > 1e-9  # the shift is there


def test_adaptive_weight_update_is_the_hand_written_formula():
    """AdaptiveWeights over seven steps of given loss values, across two lr milestones (the weights' lr decays
    with the lr) and beta 1.5: w_nat <- w_nat - lr_w * (w_nat - r_nat / (r_adv + r_nat)), r = (L / L0)**beta,
    L0 the first step's values; w_adv = 1 - w_nat."""
    method = MTARD(weight_lr=0.2, weight_beta=1.5)
    method.follow_lr_schedule([2, 4], 0.5)
    losses = [(2.0, 1.0), (1.5, 0.9), (1.2, 0.95), (1.4, 0.5), (0.7, 0.6), (0.5, 0.4), (0.45, 0.41)]
    w_nat, init = 0.5, None
    for epoch, values in enumerate(losses):
        la, ln = (torch.tensor(v, dtype=torch.float32).item() for v in values)  # the official .item() of a float32
        lr = 0.2 * 0.5 ** ((epoch >= 2) + (epoch >= 4))
        assert method.weight_lr_at(epoch) == pytest.approx(lr, rel=1e-15)
        init = init or (la, ln)
        r_adv, r_nat = (la / init[0]) ** 1.5, (ln / init[1]) ** 1.5
        w_nat = w_nat - lr * (w_nat - r_nat / (r_adv + r_nat))
        got_adv, got_nat = method.weights.update(
            torch.tensor(la, dtype=torch.float32), torch.tensor(ln, dtype=torch.float32), lr, 1.5
        )
        assert (got_nat.dtype, got_adv.dtype) == (torch.float64, torch.float64)
        assert float(got_nat) == pytest.approx(w_nat, rel=1e-14)
        assert float(got_adv) == pytest.approx(1 - w_nat, rel=1e-14)
    state = method.state_dict()
    assert float(state["weight_nat"]) == pytest.approx(w_nat, rel=1e-14) and bool(state["started"])
    assert state["initial_losses"].tolist() == [2.0, 1.0]
    # the default milestones: MTARD's own, 215, 260, 285
    assert MTARD().weight_lr_at(214) == 0.025 and MTARD().weight_lr_at(215) == pytest.approx(0.0025)


def test_weights_state_round_trip_and_bad_states():
    a = AdaptiveWeights()
    a.update(torch.tensor(2.0), torch.tensor(1.0), 0.1, 1.0)
    a.update(torch.tensor(1.0), torch.tensor(1.0), 0.1, 1.0)
    b = MTARD()
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    next_b = b.weights.update(torch.tensor(1.0), torch.tensor(0.5), 0.1, 1.0)[1]
    assert next_b == a.update(torch.tensor(1.0), torch.tensor(0.5), 0.1, 1.0)[1]
    for bad in (
        {},
        {**a.state_dict(), "weight_nat": torch.tensor(1.5, dtype=torch.float64)},
        {**a.state_dict(), "initial_losses": torch.ones(3)},
        {**a.state_dict(), "started": 1},
    ):
        with pytest.raises((KeyError, TypeError, ValueError)):
            MTARD().load_state_dict(bad)


def test_loss_needs_the_pair(setup64):
    student, adv, _, x, y = setup64
    ctx = Context(student=student, x=x, y=y, teacher=adv, teacher_logits=torch.zeros(B, C, dtype=x.dtype))
    with pytest.raises(ValueError, match="TwoTeachers"):
        MTARD().loss_at(ctx, x)


@pytest.mark.parametrize("teacher_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_engine_step_with_folded_attack_copy_cast_teachers_and_autocast(teacher_dtype, amp):
    """One engine.step.train_step with the pair as the engine's teacher: the attack through the BN-folded copy
    of the student (channels_last), both teachers in fp32 or bf16 weights, bf16 autocast or none."""
    S = tiny(0).to(memory_format=torch.channels_last)
    pair = TwoTeachers(cast_teacher(freeze(tiny(1)), teacher_dtype), cast_teacher(freeze(tiny(2)), teacher_dtype))
    before = [p.detach().clone() for p in S.parameters()]
    opt = torch.optim.SGD(S.parameters(), lr=0.1)
    method = MTARD(steps=2)
    x, y = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.randint(0, C, (8,))
    for _ in range(2):
        loss, ctx = train_step(
            S, method, opt, x, y, teacher=pair, amp_dtype=amp, generator=torch.Generator().manual_seed(0),
            fold=FoldedCopy(S),
        )  # fmt: skip
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and float(ctx.stats["loss_adv"]) > 0
    assert 0 < float(ctx.stats["weight_nat"]) < 1 and float(ctx.stats["weight_nat"]) != 0.5
    assert any(not torch.equal(a, b) for a, b in zip(before, S.parameters()))


def test_the_teacher_cache_serves_the_natural_teachers_logits_and_t_adv_always_runs():
    """With the pair as the engine's teacher, the cache stores and serves T_nat(x) (the pair's forward): a
    second step on the same views runs T_nat on no image and T_adv on every x', and the loss is the uncached
    step's."""
    pair = TwoTeachers(freeze(tiny(1)), freeze(tiny(2)))
    calls = {"adv": 0, "nat": 0}
    for name in calls:
        count = lambda m, inp, name=name: calls.__setitem__(name, calls[name] + 1)  # noqa: E731
        getattr(pair, name).register_forward_pre_hook(count)
    x, y, views = torch.rand(8, 3, 32, 32), torch.randint(0, C, (8,)), torch.arange(8) * 3
    cache = TeacherCache(8, 3, C, "cpu")
    losses = {}
    for mode in ("cached", "again", "uncached"):
        S = tiny(0)
        opt = torch.optim.SGD(S.parameters(), lr=0.1)
        calls.update(adv=0, nat=0)
        loss, ctx = train_step(
            S, MTARD(steps=1), opt, x, y, teacher=pair, generator=torch.Generator().manual_seed(0),
            cache=cache if mode != "uncached" else None, views=views if mode != "uncached" else None,
        )  # fmt: skip
        losses[mode] = loss.item()
        assert calls["adv"] == 1 and calls["nat"] == (0 if mode == "again" else 1), (mode, calls)
        with torch.no_grad():
            assert torch.allclose(ctx.teacher_logits, pair.nat(x), rtol=1e-6, atol=1e-6)
    assert losses["again"] == pytest.approx(losses["cached"], rel=1e-6) == losses["uncached"]


# ---- defaults, their sources, the command line -------------------------------------------------------------


def test_defaults_are_the_cited_official_values():
    assert get("mtard") is MTARD and get("MTARD") is MTARD and "mtard" in methods.names()
    # mtard_resnet18_cifar10.py:18-20, 74 and mtard_loss.py:40
    assert MTARD().hparams() == dict(
        eps=8 / 255, step_size=2 / 255, steps=10, init_std=0.001, weight_lr=0.025, weight_beta=1.0, kl_scale=1.0
    )
    helps = {k: hp.help for k, hp in MTARD.HPARAMS.items()}
    assert "cifar10.py:18" in helps["eps"] and "cifar10.py:74" in helps["step_size"]
    assert "mtard_loss.py:40" in helps["init_std"] and "cifar10.py:19" in helps["weight_lr"]
    assert "cifar10.py:20" in helps["weight_beta"] and "cifar100.py:79-80" in helps["kl_scale"]
    s = MTARD.SCHEDULE  # mtard_resnet18_cifar10.py:16-17, 42, 135-137
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay) == (300, 128, 0.1, 0.9, 2e-4)
    assert (s.milestones, s.gamma) == ((215, 260, 285), 0.1) and "cifar10.py:16-17" in s.source
    assert MTARD.official_setting("resnet18", "cifar100")[1]["kl_scale"] == 10.0
    assert MTARD().per_image_factor(10) == 10 and MTARD(kl_scale=10).per_image_factor(100) == 10
    assert (MTARD.attack_mode, MTARD.attack_start, MTARD.TEACHER_CACHE_AUTO) == ("eval", "normal", True)
    assert MTARD.needs_teacher and MTARD.needs_nat_teacher and MTARD.NAT_TEACHER_ARCH == "resnet56"
    for key in ("mtard_loss.py", "mtard_inner_loss_ce", "cifar10.py:44-49, 82-98", "6480a1b"):
        assert key in mtard_module.__doc__, key


@pytest.mark.parametrize("overrides", [{"weight_lr": 1.5}, {"weight_beta": -1}, {"kl_scale": 0}, {"steps": 2.5}])
def test_bad_hparams_are_user_errors(overrides):
    with pytest.raises(UserError):
        MTARD(**overrides)


def test_help_prints_the_flags_and_their_sources():
    text = " ".join(train.build_parser().format_help().split())
    for piece in ("--nat-teacher PATH", "--nat-teacher-arch", "mtard resnet56", "--weight-lr X", "--weight-beta X"):
        assert piece in text, piece
    assert "mtard_resnet18_cifar10.py:19 `weight_learn_rate = 0.025`" in text and "mtard 0.025" in text


def test_command_line_resolution():
    parse = train.build_parser().parse_args
    base = ["--method", "mtard", "--student", "tiny", "--teacher", "t.pt", "--nat-teacher", "n.pt"]
    cfg = train.resolve_config(parse(base))
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.batch_size) == (300, 0.1, 2e-4, 128)
    assert cfg.milestones == [215, 260, 285]
    assert cfg.hparams == MTARD().hparams() and cfg.teacher["arch"] == "wrn34-10"
    assert cfg.nat_teacher["arch"] == "resnet56" and cfg.nat_teacher["path"].endswith("n.pt")
    cfg = train.resolve_config(parse([*base, "--nat-teacher-arch", "tiny", "--dataset", "cifar100"]))
    assert cfg.nat_teacher["arch"] == "tiny" and cfg.hparams["kl_scale"] == 10.0
    assert train.resolve_config(parse(["--method", "rslad", "--teacher", "t.pt"])).nat_teacher is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "mtard", "--teacher", "t.pt"], "method 'mtard' needs --nat-teacher FILE"),
        (["--method", "rslad", "--nat-teacher", "n.pt"], "--nat-teacher/--nat-teacher-arch: method 'rslad' takes no"),
        (["--method", "sat", "--nat-teacher-arch", "tiny"], "method 'sat' takes no second teacher"),
        (
            ["--method", "mtard", "--teacher", "t.pt", "--nat-teacher", "n.pt", "--dataset", "cifar100"],
            "method 'mtard' on cifar100 needs --nat-teacher-arch",
        ),
    ],
)
def test_teacher_flag_errors_are_one_line(argv, message, capsys, tmp_path):
    assert train.main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cifar100_needs_an_explicit_nat_teacher_arch():
    """MTARD's natural-teacher default (resnet56, its CIFAR-10 zoo) holds on CIFAR-10 only: its CIFAR-100 models
    are DeepMind WRNs normalizing with CIFAR-10's mean/std (mtard/cifar100_models/wideresnet.py:160-165), so on
    CIFAR-100 the architecture is asked for, the error naming every choice; given, it is taken."""
    parse = train.build_parser().parse_args
    base = ["--method", "mtard", "--student", "tiny", "--teacher", "t.pt", "--nat-teacher", "n.pt"]
    with pytest.raises(UserError) as err:
        train.resolve_config(parse([*base, "--dataset", "cifar100"]))
    text = str(err.value)
    assert "--nat-teacher-arch" in text and "wideresnet.py:160-165" in text and len(text.splitlines()) == 1
    assert all(arch in text for arch in models.ARCHS)
    for arch in ("resnet56", "dm-wrn28-10", "tiny"):
        cfg = train.resolve_config(parse([*base, "--dataset", "cifar100", "--nat-teacher-arch", arch]))
        assert cfg.nat_teacher["arch"] == arch
    assert train.resolve_config(parse([*base, "--dataset", "cifar10"])).nat_teacher["arch"] == "resnet56"
    assert MTARD.default_nat_teacher_arch("cifar10") == MTARD.NAT_TEACHER_ARCH == "resnet56"
    assert "160-165" in mtard_module.__doc__ and "CIFAR10_MEAN" in mtard_module.__doc__
    for dataset, default in (("cifar10", "default resnet56"), ("cifar100", "default none on cifar100")):
        with pytest.raises(UserError, match=default):  # no --nat-teacher: the message names the right default
            train.resolve_config(parse(["--method", "mtard", "--teacher", "t.pt", "--dataset", dataset]))


# ---- end to end ------------------------------------------------------------------------------------------

COMMON = ["--student", "tiny", "--threads", "1", "--eval-n", "32", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=32, seed=3)


@pytest.fixture(scope="module")
def teachers(data, natural_teacher):
    """Two generated teacher files (tiny natural runs of other seeds): the adversarial and the natural one."""
    return tuple(natural_teacher(data, "--epochs", "1", "--seed", str(seed), *COMMON) for seed in (1, 2))


def _args(data, out, teachers, *extra):
    adv, nat = teachers
    return [
        "--method", "mtard", "--preset", "quick", "--teacher", str(adv), "--teacher-arch", "tiny",
        "--nat-teacher", str(nat), "--nat-teacher-arch", "tiny", "--train-n", "256", "--epochs", "2",
        "--data", str(data), "--out", str(out), *COMMON, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(data, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtard") / "run"
    assert train.main(_args(data, out, teachers)) == 0
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_quick_end_to_end(straight, teachers):
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["method"] == "mtard" and cfg["teacher"]["arch"] == "tiny" and cfg["nat_teacher"]["arch"] == "tiny"
    assert cfg["nat_teacher"]["path"] == str(teachers[1]) and len(cfg["nat_teacher"]["sha256"]) == 64
    assert (cfg["lr"], cfg["weight_decay"]) == (pytest.approx(1.0), pytest.approx(2e-5))  # per-element: x C, / C
    recs = _records(straight)
    assert [r["epoch"] for r in recs] == [1, 2]
    # --teacher-cache auto: on for MTARD, whose natural teacher sees the natural views only (T_adv(x') always runs)
    assert all("teacher_cache_hit_rate" in r for r in recs)
    for r in recs:
        assert 0.0 < r["train_loss"] < float("inf") and 0.0 <= r["pgd20_acc"] <= r["clean_acc"] <= 1.0
        assert 0 < r["train_weight_nat"] < 1 and r["train_weight_adv"] == pytest.approx(1 - r["train_weight_nat"])
    state = torch.load(straight / "last.pt", weights_only=True)["method"]
    assert bool(state["started"]) and float(state["weight_nat"]) != 0.5
    assert state["initial_losses"].dtype == torch.float64


def test_resume_restores_the_adaptive_weights_bitwise(straight, data, teachers, tmp_path):
    resumed = tmp_path / "resumed"
    cfg = train.resolve_config(train.build_parser().parse_args(_args(data, resumed, teachers)))
    prep = prepare(cfg)
    create_run_dir(resumed, cfg)
    run(prep, resumed, progress=False, stop_after=1)  # as if killed right after epoch 1's checkpoint
    middle = torch.load(resumed / "last.pt", weights_only=True)["method"]
    assert bool(middle["started"]) and float(middle["weight_nat"]) != 0.5
    assert train.main(["--resume", str(resumed), "--no-progress"]) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    timing = ("epoch_time_s", "eval_time_s", "images_per_s", "teacher_cache_hit_rate", "teacher_forwards_saved")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]  # noqa: E731
    assert strip(_records(straight)) == strip(_records(resumed))


def test_a_checkpoint_without_the_weights_is_refused(straight, data, teachers):
    ckpt = load_checkpoint(straight / "last.pt")
    del ckpt["method"]
    cfg = train.resolve_config(train.build_parser().parse_args(_args(data, straight, teachers)))
    p = build_parts(cfg, torch.device("cpu"), random_teacher(cfg), generator_seed=0)
    with pytest.raises(UserError, match="MTARD state is missing or malformed"):
        restore(ckpt, model=p.student, optimizer=p.optimizer, scheduler=p.scheduler, train_generator=p.generator,
                method=p.method, epochs=cfg.epochs)  # fmt: skip


def test_a_bad_nat_teacher_file_is_one_line(data, teachers, tmp_path, capsys):
    bad = tmp_path / "nat.pt"
    bad.write_bytes(b"not a checkpoint")
    args = _args(data, tmp_path / "run", (teachers[0], bad))
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--nat-teacher:" in err and str(bad) in err, err
    assert not (tmp_path / "run").exists()
    # another architecture than the file's: the same one line, naming it
    args = _args(data, tmp_path / "run2", teachers)
    args[args.index("--nat-teacher-arch") + 1] = "resnet8"
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--nat-teacher:" in err and "resnet8" in err, err


# ---- under torchrun ----------------------------------------------------------------------------------------


def test_two_processes_hold_the_weights_of_the_combined_batch(fake_cifar10, tmp_path, monkeypatch):
    """torchrun, 2 CPU processes (gloo) == 1 process with the combined batch, the adaptive weights included:
    each process averages the two loss values over the processes before the update, so both hold the weights
    of the global batch (without that, rank 0 would adapt them to its own half). tests/test_dist.py's frame:
    no BatchNorm in the student, no augmentation, x' starting at x; the teachers are seeded tiny files."""
    import test_dist

    data = fake_cifar10(n_train=128, n_test=16, seed=2)
    files = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        teacher = models.build("tiny")
        with torch.no_grad():
            teacher.linear.weight.mul_(30.0)  # confident soft labels (as tests/test_dist.py's teacher)
        files.append(tmp_path / f"teacher{seed}.pt")
        torch.save(teacher.state_dict(), files[-1])
    args = [
        "--method", "mtard", "--student", "tiny", "--teacher", str(files[0]), "--teacher-arch", "tiny",
        "--nat-teacher", str(files[1]), "--nat-teacher-arch", "tiny", "--init-std", "0", "--steps", "2",
        "--weight-lr", "0.2", "--data", str(data), "--epochs", "2", "--milestones", "1", "--teacher-cache", "off",
        *test_dist.COMMON,
    ]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    res = test_dist._torchrun(
        [str(test_dist.HERE), "--no-bn", "--no-augment", "--", *args, "--batch-size", "16", "--out", str(two)]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    test_dist._patch(monkeypatch.setattr, no_bn=True, no_augment=True)
    assert train.main([*args, "--batch-size", "32", "--out", str(one)]) == 0
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (two, one))
    assert a["rng"]["world_size"] == 2 and b["rng"]["world_size"] == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(b["method"]["weight_nat"]) != 0.5
    torch.testing.assert_close(a["method"]["weight_nat"], b["method"]["weight_nat"], rtol=1e-6, atol=0)
    torch.testing.assert_close(a["method"]["initial_losses"], b["method"]["initial_losses"], rtol=1e-6, atol=0)
    for x, y in zip(_records(two), _records(one)):
        assert x["train_weight_nat"] == pytest.approx(y["train_weight_nat"], rel=1e-6)


# ---- reproduce --------------------------------------------------------------------------------------------


def test_reproduce_sweeps_mtard_beside_rslad_and_finds_it_done(data, teachers, tmp_path, capsys):
    """`reproduce --methods rslad,mtard --nat-teacher FILE`: the natural teacher reaches MTARD's run only, the
    table names MTARD, a second call finds every stage done (the natural teacher's sha256, recorded at the start,
    is no difference); --nat-teacher with no MTARD in --methods is one line."""
    from rslad_fast import reproduce

    adv, nat = teachers
    argv = [
        "--out", str(tmp_path / "sweep"), "--methods", "rslad,mtard", "--students", "tiny", "--teacher", str(adv),
        "--teacher-arch", "tiny", "--nat-teacher", str(nat), "--nat-teacher-arch", "tiny", "--preset", "quick",
        "--no-progress", "--train-n", "128", "--epochs", "1", "--eval-n", "16", "--batch-size", "64",
        "--threads", "1", "--attacks", "clean,fgsm", "--n", "16", "--data", str(data),
    ]  # fmt: skip
    assert reproduce.main(argv) == 0
    cfgs = {m: json.loads((tmp_path / "sweep" / f"{m}-tiny" / "config.json").read_text()) for m in ("rslad", "mtard")}
    assert cfgs["rslad"]["nat_teacher"] is None and cfgs["mtard"]["nat_teacher"]["path"] == str(nat)
    assert "| tiny | MTARD | last |" in (tmp_path / "sweep" / "table2.md").read_text()
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert "all done" in capsys.readouterr().out
    argv[argv.index("rslad,mtard")] = "rslad"
    argv[argv.index("--out") + 1] = str(tmp_path / "other")
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --nat-teacher/--nat-teacher-arch: no method in --methods takes a natural teacher (mtard)"
