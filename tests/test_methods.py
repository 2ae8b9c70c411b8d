"""The training methods: each loss against a plain torch.nn.functional oracle written from the official code
(METHODS.md), the attack settings and modes, the eps ball, a few SGD steps, and the registry.

Everything runs on the CPU with the `tiny` model, batch 8, 32x32 inputs.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rslad_fast import models
from rslad_fast.attacks.pgd import random_start
from rslad_fast.errors import UserError
from rslad_fast.methods import ARD, IAD, MART, REGISTRY, RSLAD, SAT, TRADES, Context, Natural, get, names
from rslad_fast.methods import ard as ard_module
from rslad_fast.methods import mart as mart_module
from rslad_fast.methods import rslad as rslad_module
from rslad_fast.methods import sat as sat_module
from rslad_fast.methods import trades as trades_module

B, C = 8, 10
ADVERSARIAL = ["sat", "trades", "mart", "ard", "iad", "rslad"]
ATTACK_MODE = {"sat": False, "trades": False, "mart": False, "rslad": False, "ard": True, "iad": True}
pytestmark = pytest.mark.usefixtures("one_thread")  # the test machine's cores are shared


def tiny(seed):
    torch.manual_seed(seed)
    return models.build("tiny")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 32, 32, generator=g)
    x[0, 0, :4] = 0.0  # pixels on the box boundary: the clamp to [0, 1] must bite
    x[1, 1, :4] = 1.0
    y = torch.randint(0, C, (B,), generator=g)
    return x, y


def context(method, student, x, y, teacher=None, epoch=0, seed=0):
    t_logits = None
    if method.needs_teacher:
        teacher.eval()
        with torch.no_grad():
            t_logits = teacher(x)
    return Context(
        student=student,
        x=x,
        y=y,
        teacher=teacher,
        teacher_logits=t_logits,
        epoch=epoch,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture(scope="module")
def setup():
    x, y = batch()
    student, teacher = tiny(0), tiny(1)
    x_adv = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    return student, teacher, x, y, x_adv


@pytest.fixture(scope="module")
def setup64(setup):
    """The same in float64, so that the oracle comparisons can be tight."""
    student, teacher, x, y, x_adv = setup
    return copy.deepcopy(student).double(), copy.deepcopy(teacher).double(), x.double(), y, x_adv.double()


# ---- oracles: torch.nn.functional only, straight from the official codes / METHODS.md -----------------


def kl_mean(student_logits, target_logits, tau=1.0):
    """KLDivLoss()(log_softmax(S/tau), softmax(T/tau)): the elementwise mean over B*C (ARD, RSLAD)."""
    return F.kl_div(
        F.log_softmax(student_logits / tau, dim=1), F.softmax(target_logits / tau, dim=1), reduction="sum"
    ) / (B * C)


def kl_rows(student_logits, target_logits, tau=1.0):
    """KLDivLoss(reduction='none')(log_softmax(S/tau), softmax(T/tau)).sum(1) = KL(T^tau || S^tau) per row."""
    return F.kl_div(
        F.log_softmax(student_logits / tau, dim=1), F.softmax(target_logits / tau, dim=1), reduction="none"
    ).sum(dim=1)


def oracle(name, hp, S, T, x, x_adv, y, epoch):
    if name == "natural":
        return F.cross_entropy(S(x), y)
    if name == "sat":
        return F.cross_entropy(S(x_adv), y)
    if name == "trades":
        logits = S(x)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / B) * F.kl_div(F.log_softmax(S(x_adv), dim=1), F.softmax(S(x), dim=1), reduction="sum")
        return loss_natural + hp["beta"] * loss_robust
    if name == "mart":
        logits = S(x)
        logits_adv = S(x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
        new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
        loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
        nat_probs = F.softmax(logits, dim=1)
        true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
        kl = nn.KLDivLoss(reduction="none")
        loss_robust = (1.0 / B) * torch.sum(
            torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
        )
        return loss_adv + hp["beta"] * loss_robust
    with torch.no_grad():
        t_nat = T.eval()(x)
    if name == "ard":
        tau, alpha = hp["tau"], hp["alpha"]
        return alpha * tau * tau * kl_mean(S(x_adv), t_nat, tau) + (1.0 - alpha) * F.cross_entropy(S(x), y)
    if name == "iad":
        tau, alpha = hp["tau"], hp["alpha"]
        outputs = S(x_adv)
        basic = S(x)
        teacher_term = kl_rows(outputs, t_nat, tau)
        if epoch < hp["begin"]:
            return alpha * tau * tau * teacher_term.mean() + (1.0 - alpha) * F.cross_entropy(basic, y)
        with torch.no_grad():
            guide = T.eval()(x_adv)
        A = F.softmax(guide, dim=1).gather(1, y[:, None]).squeeze(1).pow(hp["beta"])
        if hp["table1_form"]:
            teacher_term = A * teacher_term
        return (
            alpha * tau * tau * (1 / B) * teacher_term.sum()
            + alpha * (1 / B) * (kl_rows(outputs, basic) * (1 - A)).sum()
            + (1.0 - alpha) * F.cross_entropy(basic, y)
        )
    if name == "rslad":
        a = hp["alpha"]
        return a * kl_mean(S(x_adv), t_nat) + (1 - a) * kl_mean(S(x), t_nat)
    raise AssertionError(name)


LOSS_CASES = [
    ("natural", {}, 0),
    ("sat", {}, 0),
    ("trades", {}, 0),
    ("trades", {"beta": 1.0}, 0),
    ("mart", {}, 0),
    ("mart", {"beta": 5.0}, 0),
    ("ard", {}, 0),
    ("ard", {"alpha": 0.6, "tau": 4.0}, 0),
    ("iad", {}, 0),
    ("iad", {}, 60),
    ("iad", {"alpha": 0.7, "tau": 2.0, "begin": 3}, 3),
    ("iad", {"table1_form": True, "tau": 2.0}, 60),
    ("rslad", {}, 0),
    ("rslad", {"alpha": 0.5}, 0),
]


@pytest.mark.parametrize("name,overrides,epoch", LOSS_CASES)
def test_loss_matches_oracle(setup64, monkeypatch, name, overrides, epoch):
    """(1) loss at a fixed x' equals the official formula: value and every parameter gradient (this catches a
    wrongly detached target, e.g. TRADES' f(x), MART's p_nat, IAD's S(x))."""
    student, teacher, x, y, x_adv = setup64
    method = get(name)(**overrides)
    S1, S2 = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    ctx = context(method, S1, x, y, teacher, epoch=epoch)
    monkeypatch.setattr(method, "attack", lambda c: None if name == "natural" else x_adv.clone())
    loss = method.loss(ctx)
    loss.backward()
    expected = oracle(name, method.hparams(), S2, teacher, x, x_adv, y, epoch)
    expected.backward()
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-9, atol=1e-12), (loss.item(), expected.item())
    for (pname, p1), p2 in zip(S1.named_parameters(), S2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-7, atol=1e-12), pname
    assert "loss" in ctx.stats and all(torch.isfinite(torch.as_tensor(v)) for v in ctx.stats.values())
    assert float(ctx.stats["loss"]) == pytest.approx(loss.item())


def test_iad_warmup_switches_at_begin(setup64):
    """Before `begin` IAD's loss is the warm-up (no teacher on x'); from `begin` on, the IAD loss."""
    student, teacher, x, y, x_adv = setup64
    method = IAD(begin=5)
    assert not method.introspecting(4) and method.introspecting(5)
    calls = []
    handle = teacher.register_forward_pre_hook(lambda m, inp: calls.append(m.training))
    losses = {}
    try:
        for epoch in (4, 5):
            ctx = context(method, copy.deepcopy(student).train(), x, y, teacher, epoch=epoch)
            calls.clear()
            teacher.train()  # the method must put the teacher in eval for T(x') and give its mode back
            losses[epoch] = method.loss_at(ctx, x_adv).item()
            assert calls == ([] if epoch == 4 else [False])
            assert teacher.training
    finally:
        handle.remove()
        teacher.eval()
    S = copy.deepcopy(student).train()
    hp = method.hparams()
    assert losses[4] == pytest.approx(oracle("iad", hp, S, teacher, x, x_adv, y, 4).item(), rel=1e-9)
    assert losses[5] == pytest.approx(oracle("iad", hp, S, teacher, x, x_adv, y, 5).item(), rel=1e-9)
    assert losses[5] > losses[4]  # the self-introspection term is >= 0, and > 0 here since x' != x


@pytest.mark.parametrize("epoch", [0, 60])
def test_iad_runs_each_input_once_where_the_official_loop_runs_more(setup64, epoch):
    """A deliberate difference, documented in methods/iad.py: IAD-I.py's loop runs, after the attack's final
    S(x'), an unused `basic_net(pert_inputs).detach()` and, from `begin` on, `basic_net(inputs)` twice (the
    self-KL target and the CE term), all in train mode. Ours runs S(x') and S(x) once each: the same loss and
    parameter gradients, but BatchNorm's running statistics (what eval mode uses) see fewer batches."""
    from rslad_fast.methods import iad as iad_module

    doc = iad_module.__doc__
    assert "basic_net(pert_inputs)" in doc and "running statistics" in doc
    student, teacher, x, y, x_adv = setup64
    method = IAD(steps=3)
    forwards = []
    whole = copy.deepcopy(student).train()
    handle = whole.register_forward_pre_hook(lambda m, inp: forwards.append(m.training))
    try:
        method.loss(context(method, whole, x, y, teacher, epoch=epoch))  # attack + loss: one training step
    finally:
        handle.remove()
    assert forwards == [True] * (method.steps + 2)  # the attack's steps, then S(x') and S(x) once each

    ours, official = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    loss = method.loss_at(context(method, ours, x, y, teacher, epoch=epoch), x_adv)
    loss.backward()
    assert ours.bn1.num_batches_tracked.item() - student.bn1.num_batches_tracked.item() == 2

    # the official forward sequence after the attack, on the same x' (IAD-I.py `train`)
    hp, S, B_ = method.hparams(), official, x.shape[0]
    with torch.no_grad():
        t_nat, guide = teacher.eval()(x), teacher.eval()(x_adv)
    outputs = S(x_adv)
    S(x_adv).detach()  # basicop: computed, never used
    teacher_term = kl_rows(outputs, t_nat, hp["tau"])
    if epoch >= hp["begin"]:
        A = F.softmax(guide, dim=1).gather(1, y[:, None]).squeeze(1).pow(hp["beta"])
        expected = (
            hp["alpha"] * hp["tau"] ** 2 / B_ * teacher_term.sum()
            + hp["alpha"] / B_ * (kl_rows(outputs, S(x)) * (1 - A)).sum()
            + (1.0 - hp["alpha"]) * F.cross_entropy(S(x), y)
        )
    else:
        expected = hp["alpha"] * hp["tau"] ** 2 / B_ * teacher_term.sum() + (1.0 - hp["alpha"]) * F.cross_entropy(
            S(x), y
        )
    expected.backward()
    tracked = official.bn1.num_batches_tracked.item() - student.bn1.num_batches_tracked.item()
    assert tracked == (4 if epoch >= hp["begin"] else 3)
    assert torch.allclose(loss, expected, rtol=1e-9, atol=1e-12)
    for p1, p2 in zip(ours.parameters(), official.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-7, atol=1e-12)
    assert not torch.allclose(ours.bn1.running_mean, official.bn1.running_mean)


# ---- the attacks -----------------------------------------------------------------------------------------

OFFICIAL_ATTACK = {  # module, entry point, expected keyword arguments
    "sat": (sat_module, "pgd", dict(eps=8 / 255, alpha=2 / 255, steps=10, start="uniform", mode="eval")),
    "trades": (
        trades_module,
        "pgd",
        dict(eps=0.031, alpha=0.007, steps=10, start="normal", init_std=0.001, mode="eval"),
    ),
    "mart": (mart_module, "pgd", dict(eps=0.031, alpha=0.007, steps=10, start="normal", init_std=0.001, mode="eval")),
    "ard": (ard_module, "pgd", dict(eps=8 / 255, alpha=2 / 255, steps=10, start="uniform", mode="train")),
    "iad": (ard_module, "pgd", dict(eps=8 / 255, alpha=2 / 255, steps=10, start="uniform", mode="train")),
    "rslad": (rslad_module, "fused_kl_pgd", dict(eps=8 / 255, alpha=2 / 255, steps=10, init_std=0.001)),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_attack_goes_through_the_engine_with_official_settings(setup, monkeypatch, name):
    student, teacher, x, y, _ = setup
    module, entry, expected = OFFICIAL_ATTACK[name]
    real, seen = getattr(module, entry), []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, entry, spy)
    method = get(name)()
    ctx = context(method, copy.deepcopy(student).train(), x, y, teacher)
    method.attack(ctx)
    assert len(seen) == 1
    for key, value in expected.items():
        assert seen[0][key] == pytest.approx(value) if isinstance(value, float) else seen[0][key] == value, key
    assert seen[0]["generator"] is ctx.generator


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_attack_raises_its_objective_and_stays_in_the_ball(setup, name):
    """(2) the objective at x' beats x and the start point; (3) x' in the eps ball and in [0, 1];
    (4) the student's mode during the attack is the official one, and its modes come back afterwards."""
    student, teacher, x, y, _ = setup
    method = get(name)()
    S = copy.deepcopy(student).train()
    S.bn2.eval()  # a mixed state, to see it restored module by module
    before = [m.training for m in S.modules()]
    ctx = context(method, S, x, y, teacher, seed=3)
    modes = []
    handle = S.register_forward_pre_hook(lambda m, inp: modes.append(m.bn1.training))
    try:
        x_adv = method.attack(ctx)
    finally:
        handle.remove()
    assert modes and all(mode == ATTACK_MODE[name] for mode in modes)
    assert [m.training for m in S.modules()] == before
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= method.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()

    start_kind = "normal" if name in ("trades", "mart", "rslad") else "uniform"
    start = random_start(
        x, start_kind, method.eps, getattr(method, "init_std", 0.001), torch.Generator().manual_seed(3)
    )
    buffers = [b.clone() for b in S.buffers()]
    obj_adv = method.attack_objective(ctx, x_adv)
    obj_start = method.attack_objective(ctx, start)
    obj_nat = method.attack_objective(ctx, x)
    assert all(torch.equal(a, b) for a, b in zip(buffers, S.buffers())), "attack_objective left a trace"
    assert obj_adv.dim() == 0
    assert obj_adv > obj_start and obj_adv > obj_nat, (obj_adv.item(), obj_start.item(), obj_nat.item())


def test_sat_attack_mode_switch(setup):
    student, _, x, y, _ = setup
    method = SAT(attack_mode="train")
    S = copy.deepcopy(student).eval()
    modes = []
    handle = S.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    try:
        method.attack(context(method, S, x, y))
    finally:
        handle.remove()
    assert modes and all(modes) and not S.training


@pytest.mark.parametrize("name", ["natural"] + ADVERSARIAL)
def test_outer_forwards_are_train_mode(setup, name):
    student, teacher, x, y, x_adv = setup
    method = get(name)(**({"begin": 0} if name == "iad" else {}))
    S = copy.deepcopy(student).train()
    ctx = context(method, S, x, y, teacher)
    modes = []
    handle = S.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    try:
        method.loss_at(ctx, None if name == "natural" else x_adv)
    finally:
        handle.remove()
    assert modes == [True] * (1 if name in ("natural", "sat") else 2)


# ---- training decreases the loss ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("natural", {}),
        ("sat", {}),
        ("trades", {}),
        ("mart", {}),
        ("ard", {}),
        ("iad", {}),
        ("iad", {"begin": 0}),
        ("rslad", {}),
    ],
)
def test_sgd_steps_decrease_the_loss(setup, name, overrides):
    """(5) 8 SGD steps (lr 0.05) on one fixed batch, with the same attack start each step (3 attack steps
    instead of 10, to keep the test short)."""
    _, teacher, x, y, _ = setup
    method = get(name)(**overrides, **({} if name == "natural" else {"steps": 3}))
    S = tiny(7).train()
    opt = torch.optim.SGD(S.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = method.loss(context(method, S, x, y, teacher, seed=11))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# ---- registry, hyperparameters, schedules -------------------------------------------------------------


def test_registry_names_and_aliases():
    assert names() == (
        "adaad", "ard", "dgad", "iad", "mart", "mtard", "natural", "peeraid", "rslad", "sat", "trades"
    )  # fmt: skip
    assert set(REGISTRY) == set(names())
    classes = {"natural": Natural, "sat": SAT, "trades": TRADES, "mart": MART, "ard": ARD, "iad": IAD, "rslad": RSLAD}
    for name, cls in classes.items():
        assert get(name) is cls and get(name.upper()) is cls and cls.name == name
    for alias in ("madry", "PGD-AT", "pgd_at", "AT", " sat "):
        assert get(alias) is SAT
    for alias in ("nat", "Standard", "NATURAL"):
        assert get(alias) is Natural
    for bad in ("foo", "", "rslad2", None, 3):
        with pytest.raises(UserError):
            get(bad)
    assert {n for n in names() if get(n).needs_teacher} == {"adaad", "ard", "dgad", "iad", "mtard", "rslad"}


def test_hparams_and_schedules_cite_their_source():
    for name in names():
        cls = get(name)
        for key, hp in cls.HPARAMS.items():
            assert len(hp.help) > 20, (name, key)
        assert cls.SCHEDULE.source and cls.SCHEDULE.momentum == 0.9
        if name != "natural":
            assert {"eps", "step_size", "steps"} <= set(cls.HPARAMS)
    s = RSLAD.SCHEDULE
    assert (s.epochs, s.lr, s.milestones, s.weight_decay, s.batch_size) == (300, 0.1, (215, 260, 285), 2e-4, 128)
    s = TRADES.SCHEDULE
    assert (s.epochs, s.lr, s.milestones, s.weight_decay) == (76, 0.1, (74, 89, 99), 2e-4)
    assert (ARD.SCHEDULE.epochs, ARD.SCHEDULE.milestones) == (200, (100, 150))
    assert MART.SCHEDULE.weight_decay == 7e-4
    d = TRADES().hparams()
    assert (d["eps"], d["step_size"], d["beta"]) == (0.031, 0.007, 6.0)
    assert MART().beta == 6.0 and ARD().tau == 30.0 and ARD().alpha == 1.0
    assert (IAD().tau, IAD().beta, IAD().begin, IAD().table1_form) == (1.0, 0.1, 60, False)
    assert RSLAD().alpha == pytest.approx(5 / 6) and RSLAD().eps == pytest.approx(8 / 255)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("sat", {"eps": 1.5}),
        ("sat", {"eps": -0.01}),
        ("sat", {"eps": float("nan")}),
        ("trades", {"eps": "abc"}),
        ("trades", {"steps": -1}),
        ("mart", {"steps": 2.5}),
        ("sat", {"steps": True}),
        ("ard", {"step_size": -0.1}),
        ("rslad", {"alpha": 1.2}),
        ("ard", {"alpha": -0.1}),
        ("ard", {"tau": 0}),
        ("iad", {"begin": -1}),
        ("iad", {"begin": 1.5}),
        ("iad", {"beta": -1}),
        ("ard", {"lr_bug": "maybe"}),
        ("iad", {"table1_form": 2}),
        ("trades", {"beta": -1}),
        ("mart", {"init_std": -0.1}),
        ("sat", {"attack_mode": "keep"}),
        ("rslad", {"cuda_graph": "sometimes"}),
        ("natural", {"eps": 0.1}),
        ("trades", {"gamma": 1}),
    ],
)
def test_bad_hparams_are_user_errors(name, overrides):
    with pytest.raises(UserError):
        get(name)(**overrides)


def test_hparams_from_strings_are_coerced():
    m = ARD(steps=10.0, eps="0.03", lr_bug="true")
    assert m.steps == 10 and isinstance(m.steps, int) and m.eps == 0.03 and m.lr_bug is True
    assert RSLAD(cuda_graph="false").cuda_graph is False and RSLAD().cuda_graph == "auto"


@pytest.mark.parametrize("cls", [ARD, IAD])
def test_lr_bug_milestones(cls):
    fixed, buggy = cls(), cls(lr_bug=True)
    assert fixed.milestones() == (100, 150) and buggy.milestones() == (100,)
    assert [fixed.lr_at(e) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert [buggy.lr_at(e) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def test_other_methods_use_their_schedule_milestones():
    for name in ("natural", "sat", "trades", "mart", "rslad"):
        m = get(name)()
        assert m.milestones() == tuple(m.SCHEDULE.milestones)
    assert RSLAD().lr_at(214) == pytest.approx(0.1) and RSLAD().lr_at(215) == pytest.approx(0.01)
    assert RSLAD().lr_at(299) == pytest.approx(1e-4)


# ---- MART: two official settings, chosen by the student's architecture ---------------------------------


def _resolve(method, student, **given):
    from rslad_fast.engine import RunSettings, resolve

    return resolve(RunSettings(method=method, student=student, device="cpu", threads=1, **given))


@pytest.mark.parametrize(
    "student,setting",
    [
        ("resnet18", "resnet"),
        ("ResNet-18", "resnet"),
        ("resnet8", "resnet"),
        ("mnv2", "resnet"),
        ("tiny", "resnet"),
        ("wrn34-10", "wrn"),
        ("wrn70-16", "wrn"),
        ("wrn34-20", "wrn"),
        ("dm-wrn28-10", "wrn"),
        ("DM_WRN_70_16", "wrn"),
    ],
)
def test_mart_setting_follows_the_student_architecture(student, setting):
    """MART's train_resnet.py (ResNet-18): beta 5, lr 0.01, weight decay 3.5e-3, 120 epochs;
    train_wideresnet.py (WRN-34-10): beta 6, lr 0.1, weight decay 7e-4, 90 epochs; both decay x0.1 at
    epochs 75, 90, 100 (from 1). The wide ResNets get the second, every other student the first."""
    cfg = _resolve("mart", student)
    got = (cfg.hparams["beta"], cfg.lr, cfg.weight_decay, cfg.epochs, cfg.milestones, cfg.batch_size, cfg.momentum)
    if setting == "resnet":
        assert got == (5.0, 0.01, 3.5e-3, 120, [74, 89, 99], 128, 0.9)
        assert "train_resnet.py" in cfg.schedule_source
    else:
        assert got == (6.0, 0.1, 7e-4, 90, [74, 89, 99], 128, 0.9)
        assert "train_wideresnet.py" in cfg.schedule_source
    # the attack is the same in both scripts
    assert (cfg.hparams["eps"], cfg.hparams["step_size"], cfg.hparams["steps"]) == (0.031, 0.007, 10)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_mart_gives_every_wideresnet_in_archs_the_wrn_setting(arch):
    """By family: an architecture whose built module is a WideResNet (TRADES', DeepMind's, Chen2021LTD's
    layout; built on the meta device, no memory) resolves to train_wideresnet.py's setting, every other one
    to train_resnet.py's, so a WRN added to models.ARCHS cannot fall back to the ResNet-18 setting."""
    with torch.device("meta"):
        wide = "WideResNet" in type(models.build(arch)).__name__
    cfg = _resolve("mart", arch)
    got = (cfg.hparams["beta"], cfg.lr, cfg.weight_decay, cfg.epochs)
    assert got == ((6.0, 0.1, 7e-4, 90) if wide else (5.0, 0.01, 3.5e-3, 120)), (arch, wide)
    assert MART.is_wide(arch) == wide


def test_mart_explicit_flags_override_the_architecture_setting():
    cfg = _resolve("mart", "resnet18", hparams={"beta": 6.0}, lr=0.1, weight_decay=7e-4, epochs=90)
    assert (cfg.hparams["beta"], cfg.lr, cfg.weight_decay, cfg.epochs) == (6.0, 0.1, 7e-4, 90)
    cfg = _resolve("mart", "wrn34-10", hparams={"beta": 5}, lr=0.01)
    assert (cfg.hparams["beta"], cfg.lr, cfg.weight_decay, cfg.epochs) == (5.0, 0.01, 7e-4, 90)


def test_other_methods_have_one_setting_for_every_architecture():
    for name in ("trades", "ard", "rslad"):
        a, b = _resolve(name, "resnet18"), _resolve(name, "wrn34-10")
        assert (a.hparams, a.lr, a.weight_decay, a.epochs) == (b.hparams, b.lr, b.weight_decay, b.epochs)


def test_fused_kl_pgd_says_what_it_expects():
    """A model returning a tuple (logits, features) got "'tuple' object has no attribute 'float'", and a NaN,
    inf or negative init_std ran (a NaN start); now one clear error each."""
    from rslad_fast.attacks.kl_pgd import fused_kl_pgd

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny(0)

        def forward(self, x):
            return self.net(x), x.mean()

    x, _ = batch()
    t = torch.randn(B, C)
    with pytest.raises(TypeError, match=r"\[batch, classes\].*tuple"):
        fused_kl_pgd(Pair(), x, t, steps=1)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        fused_kl_pgd(tiny(0), x, torch.randn(B, C + 1), steps=1)  # logits of another class count
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="init_std"):
            fused_kl_pgd(tiny(0), x, t, steps=1, init_std=bad)
    assert fused_kl_pgd(tiny(0), x, t, steps=1, init_std=0.0).shape == x.shape
