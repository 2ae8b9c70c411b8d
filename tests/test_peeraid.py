"""PeerAiD (rslad_fast/methods/peeraid.py) against a transcription of the official code, jaewonalive/PeerAiD:
`attack_function.py` `LinfPeerAttack` (the attack) and `main.py`'s `train_kd` (lines 340-404: both losses, one
backward, both SGD steps), in float64 on the `tiny` model over several steps (momentum, the peer's lr decay);
its defaults against the cited values; `train --method peeraid` end to end, resumed bitwise with its peer;
2 torchrun processes == 1; `reproduce --methods peeraid`.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rslad_fast import methods, models, reproduce, train
from rslad_fast.engine import create_run_dir, prepare, run
from rslad_fast.engine.step import train_step
from rslad_fast.errors import UserError
from rslad_fast.methods import Context, PeerAiD, get
from rslad_fast.methods import peeraid as peeraid_module
from rslad_fast.models.fold import FoldedCopy

B, C = 8, 10
pytestmark = pytest.mark.usefixtures("one_thread")  # the test machine's cores are shared


def tiny(seed, num_classes=C):
    torch.manual_seed(seed)
    return models.build("tiny", num_classes)


@pytest.fixture(scope="module")
def setup64():
    """Student, peer (another init), a batch with pixels on the box's faces, its labels, a fixed x', float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 32, 32, generator=g, dtype=torch.float64)
    x[0, 0, :4] = 0.0
    x[1, 1, :4] = 1.0
    y = torch.randint(0, C, (B,), generator=g)
    x_adv = (x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return tiny(0).double(), tiny(1).double(), x, y, x_adv


def bound(peer, **overrides):
    method = PeerAiD(**overrides)
    method.bind_peer(peer)
    return method


# ---- the official code, transcribed (torch.nn / F only) --------------------------------------------------


def official_attack(model, teacher_logits, x_natural, generator, alpha, epsilon, k_step):
    """attack_function.py:65-84, LinfPeerAttack.perturb (its randn drawn from `generator`)."""
    criterion_kl = nn.KLDivLoss(reduction="none")  # size_average=False, reduce=False
    model.eval()
    x = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, generator=generator, dtype=x_natural.dtype)
    for _ in range(k_step):
        x.requires_grad_()
        with torch.enable_grad():
            loss_kl = torch.sum(criterion_kl(F.log_softmax(model(x), dim=1), F.softmax(teacher_logits, dim=1)))
        grad = torch.autograd.grad(loss_kl, [x])[0]
        x = x.detach() + alpha * torch.sign(grad.detach())
        x = torch.min(torch.max(x, x_natural - epsilon), x_natural + epsilon)
        x = torch.clamp(x, 0, 1).detach()
    return x


def official_step(student_net, peer_net, student_optimizer, peer_optimizer, inputs, targets, adv, a):
    """main.py:342-404 with the attack's output `adv` given; `a` holds the arguments. Returns loss_total."""
    student_optimizer.zero_grad()
    peer_optimizer.zero_grad()
    student_net.train()
    peer_net.train()
    adv_outputs = peer_net(adv)
    student_logit_target = student_net(adv)
    tau, T = a["tau"], a["temperature"]
    loss_peer = (
        nn.CrossEntropyLoss()(adv_outputs, targets) * a["gamma1"]
        + nn.KLDivLoss()(F.log_softmax(adv_outputs / tau, dim=1), F.softmax(student_logit_target / tau, dim=1))
        * a["gamma2"]
        * tau
        * tau
    )
    peer_outputs = adv_outputs.clone()
    peer_outputs.detach_()
    student_outputs = student_net(adv)
    logit_nat = student_net(inputs)
    kl_peer = nn.KLDivLoss()(F.log_softmax(student_outputs / T, dim=1), F.softmax(peer_outputs / T, dim=1))
    kl_nat = nn.KLDivLoss()(F.log_softmax(student_outputs / T, dim=1), F.softmax(logit_nat / T, dim=1))
    loss_student = (
        F.cross_entropy(student_outputs, targets) * a["lamb1"]
        + kl_peer * (a["lamb2"] * T * T)
        + kl_nat * (a["lamb3"] * T * T)
    )
    loss_total = loss_peer + loss_student
    loss_total.backward()
    peer_optimizer.step()
    student_optimizer.step()
    return loss_total.detach()


def official_moving_average(net1, net2, alpha=1):
    """utils/SWA.py:25-28."""
    for param1, param2 in zip(net1.parameters(), net2.parameters()):
        param1.data *= 1.0 - alpha
        param1.data += param2.data * alpha


def official_bn_update(loader, model):
    """utils/SWA.py:61-87 (`input.cuda()` dropped)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.train()
    momenta = {}
    for m in norms:
        m.running_mean = torch.zeros_like(m.running_mean)
        m.running_var = torch.ones_like(m.running_var)
        momenta[m] = m.momentum
    n = 0
    for input, _ in loader:
        b = input.data.size(0)
        momentum = b / (n + b)
        for module in momenta.keys():
            module.momentum = momentum
        model(input)
        n += b
    for m in norms:
        m.momentum = momenta[m]


def adjust_learning_rate(optimizer, epoch, lr_decay_epochs, learning_rate):
    """main.py:840-852."""
    lr = learning_rate
    for i in lr_decay_epochs:
        if epoch < i:
            break
        lr /= 10
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


# ---- the attack ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"steps": 3, "eps": 16 / 255, "step_size": 4 / 255}])
def test_attack_equals_linf_peer_attack(setup64, overrides):
    """x' from the same random start equals LinfPeerAttack's with the peer's eval-mode logits P(x) as its
    target; the student is in eval mode during it and both models get their modes back."""
    student, peer, x, y, _ = setup64
    method = bound(copy.deepcopy(peer).train(), **overrides)
    S = copy.deepcopy(student).train()
    modes = []
    hook = S.register_forward_pre_hook(lambda m, inp: modes.append((m.bn1.training, torch.is_grad_enabled())))
    ctx = Context(student=S, x=x, y=y, generator=torch.Generator().manual_seed(4))
    try:
        ours = method.attack(ctx)
    finally:
        hook.remove()
    assert modes == [(False, True)] * method.steps and S.training and method.peer.training
    with torch.no_grad():
        target = copy.deepcopy(peer).eval()(x)  # main.py:346-348
    expected = official_attack(
        copy.deepcopy(student), target, x, torch.Generator().manual_seed(4), method.step_size, method.eps, method.steps
    )
    assert not ours.requires_grad and ours.dtype == torch.float64
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max().item()
    assert (ours - x).abs().max() <= method.eps + 1e-12 and ours.min() >= 0 and ours.max() <= 1
    assert method.attack_objective(ctx, ours).item() > method.attack_objective(ctx, x).item()


# ---- the loss and both models' steps ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # the official KLDivLoss()
@pytest.mark.parametrize(
    "overrides",
    [{}, {"lamb1": 0.3, "gamma2": 1.0, "temperature": 2.0, "tau": 3.0, "lamb3": 0.5}],
)
def test_three_steps_of_both_models_match_train_kd(setup64, overrides):
    """Three steps (epochs 0, 1, 1; the lr divided at milestone 1): each loss equals main.py's loss_total,
    and after each step the student's and the peer's weights, BatchNorm statistics and momenta equal
    main.py's, whose single backward of loss_peer + loss_student feeds both SGD steps."""
    student, peer, x, y, x_adv = setup64
    method = bound(copy.deepcopy(peer).train(), **overrides)
    method.follow_lr_schedule((1,), 0.1)
    S = copy.deepcopy(student).train()
    s_opt = torch.optim.SGD(S.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    S_off, P_off = copy.deepcopy(student), copy.deepcopy(peer)
    s_off = torch.optim.SGD(S_off.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)  # main.py:219-220
    p_off = torch.optim.SGD(P_off.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    a = method.hparams()
    for step, epoch in enumerate((0, 1, 1)):
        for opt in (s_opt, s_off):
            adjust_learning_rate(opt, epoch, [1], 0.1)
        adjust_learning_rate(p_off, epoch, [1], 0.1)
        ctx = Context(student=S, x=x, y=y, epoch=epoch)
        loss = method.loss_at(ctx, x_adv)
        s_opt.zero_grad()
        loss.backward()
        s_opt.step()
        expected = official_step(S_off, P_off, s_off, p_off, x, y, x_adv, a)
        assert torch.allclose(loss.detach(), expected, rtol=1e-10, atol=1e-14), (step, loss.item(), expected.item())
        assert float(ctx.stats["loss"]) == pytest.approx(expected.item(), rel=1e-10)
        for mine, theirs in ((S, S_off), (method.peer, P_off)):
            for (name, t1), t2 in zip(mine.state_dict().items(), theirs.state_dict().values()):
                assert torch.allclose(t1.double(), t2.double(), rtol=1e-9, atol=1e-12), (step, name)
        for o1, o2 in ((s_opt, s_off), (method.peer_optimizer, p_off)):
            assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
            for s1, s2 in zip(o1.state.values(), o2.state.values()):
                assert torch.allclose(s1["momentum_buffer"], s2["momentum_buffer"], rtol=1e-9, atol=1e-12)
    assert {"loss_student", "loss_peer", "acc_nat", "acc_adv", "peer_acc_adv"} <= set(ctx.stats)


def test_checkpoint_state_round_trip(setup64):
    """state_dict holds the peer and its optimizer; a state loaded before the peer is bound (as --resume
    restores it into the engine's freshly built method) is applied when it is."""
    student, peer, x, y, x_adv = setup64
    method = bound(copy.deepcopy(peer))
    S = copy.deepcopy(student).train()
    method.loss_at(Context(student=S, x=x, y=y), x_adv).backward()
    state = copy.deepcopy(method.state_dict())
    fresh = PeerAiD()
    assert fresh.state_dict() == {}
    fresh.load_state_dict(state)
    fresh.bind_peer(tiny(7).double())
    for k, v in method.peer.state_dict().items():
        assert torch.equal(fresh.peer.state_dict()[k], v), k
    assert fresh.peer_optimizer.state_dict()["state"].keys() == method.peer_optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="bind_peer"):
        PeerAiD().loss_at(Context(student=S, x=x, y=y), x_adv)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_engine_step_with_folded_attack_copy_and_autocast(amp):
    """One engine.step.train_step through the BN-folded copy, bf16 autocast or none: a finite float32 loss,
    and both the student and the peer moved."""
    S = tiny(0).to(memory_format=torch.channels_last)
    method = bound(tiny(1).to(memory_format=torch.channels_last), steps=2)
    before = [p.detach().clone() for p in (*S.parameters(), *method.peer.parameters())]
    opt = torch.optim.SGD(S.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, C, (8,))
    loss, ctx = train_step(
        S, method, opt, x, y, amp_dtype=amp, generator=torch.Generator().manual_seed(0), fold=FoldedCopy(S)
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    after = [*S.parameters(), *method.peer.parameters()]
    n_student = len(list(S.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before[:n_student], after[:n_student]))
    assert any(not torch.equal(a, b) for a, b in zip(before[n_student:], after[n_student:]))


# ---- the SWA student ---------------------------------------------------------------------------------------


def _averaged_state(model):
    """What SWA defines: the parameters and the BatchNorm statistics (not num_batches_tracked)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_swa_student_equals_main_py_moving_average_and_bn_update():
    """after_epoch over 4 epochs (swa_start 1) against main.py:427-432 with utils/SWA.py transcribed: a fresh
    model averaged with 1/(n+1) and its BatchNorm statistics recomputed over batches of unequal sizes (the
    weighting by size shows), in float64; the momenta and mode given back."""
    g = torch.Generator().manual_seed(3)
    loader = [(torch.rand(b, 3, 32, 32, generator=g, dtype=torch.float64), None) for b in (8, 8, 5)]
    student = tiny(0).double()
    method = PeerAiD(swa_start=1)
    method.bind_average(copy.deepcopy(student))
    official, n = tiny(9).double(), 0  # main.py:169: a fresh model
    for epoch in range(4):
        with torch.no_grad():  # "training": the weights move between the epochs
            for p in student.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        out = method.after_epoch(epoch, student, lambda: (x for x, _ in loader))
        if epoch >= 1:  # main.py:427
            official_moving_average(official, student, 1.0 / (n + 1))
            n += 1
            official_bn_update(loader, official)
            assert out is method.average and not out.training and method.swa_n == n
            ours, theirs = _averaged_state(out), _averaged_state(official)
            for key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-12, atol=1e-12, msg=key)
        else:
            assert out is None and method.swa_n == 0
    assert all(m.momentum == 0.1 for m in method.average.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(p.requires_grad for p in method.average.parameters())
    # the 3 averaged snapshots' mean, and the student's own statistics left alone
    assert not torch.equal(method.average.bn1.running_mean, student.bn1.running_mean)


def test_swa_starts_at_the_first_milestone_unless_given():
    method = PeerAiD()
    assert method.first_average_epoch() == 214  # main.py:110-111: lr_decay_epochs_student[0]
    method.follow_lr_schedule([3, 5], 0.1)
    assert method.first_average_epoch() == 3
    method.follow_lr_schedule([], 0.1)
    assert method.first_average_epoch() is None  # no milestone: never (the official start is that milestone)
    assert PeerAiD(swa_start=0).first_average_epoch() == 0
    unbound = PeerAiD(swa=False)
    assert unbound.after_epoch(300, tiny(0), lambda: iter(())) is None


def test_averaging_helpers_edge_cases():
    from rslad_fast.models.averaging import bn_update, moving_average

    linear = nn.Linear(3, 2)
    assert bn_update(linear, [torch.rand(4, 3)]) == 0  # no BatchNorm: nothing to recompute, no pass made
    with pytest.raises(ValueError, match="same parameters"):
        moving_average(linear, nn.Linear(3, 3), 0.5)
    model = tiny(0).eval()
    assert bn_update(model, [torch.rand(3, 3, 32, 32), torch.rand(2, 3, 32, 32)]) == 5 and not model.training


@pytest.mark.parametrize(
    "argv, averages",
    [([], True), (["--epochs", "5", "--swa-start", "5"], False), (["--epochs", "5", "--milestones", ""], False),
     (["--no-swa"], False), (["--epochs", "5", "--milestones", "4"], True)],
)  # fmt: skip
def test_only_a_run_that_averages_keeps_an_swa_student(argv, averages):
    from rslad_fast.engine.build import build_parts

    cfg = train.resolve_config(train.build_parser().parse_args(["--method", "peeraid", "--student", "tiny", *argv]))
    method = build_parts(cfg, torch.device("cpu"), None, generator_seed=0).method
    assert (method.average is not None) == averages and ("swa" in method.state_dict()) == averages


def test_the_time_estimate_counts_the_swa_students_evaluations():
    from rslad_fast.engine.estimate import averaged_epochs, estimate_run

    parse = train.build_parser().parse_args
    cfg = train.resolve_config(parse(["--method", "peeraid", "--student", "resnet18"]))  # SWA from epoch 214
    assert [averaged_epochs(cfg, left) for left in (300, 100, 50, 0)] == [86, 86, 50, 0]
    assert estimate_run(cfg, 1.0, 10, 100, eval_seconds=2.0) == 100 * (10 + 2) + 86 * 2
    for argv in (["--method", "peeraid", "--no-swa"], ["--method", "rslad"]):
        assert averaged_epochs(train.resolve_config(parse([*argv, "--student", "resnet18"])), 300) == 0


def test_swa_state_round_trips_and_malformed_state_is_refused(setup64):
    student, peer, *_ = setup64
    method = bound(copy.deepcopy(peer), swa_start=0)
    method.bind_average(copy.deepcopy(student))
    method.after_epoch(0, student, lambda: iter([torch.rand(4, 3, 32, 32, dtype=torch.float64)]))
    method.swa_best_acc = 0.25
    state = copy.deepcopy(method.state_dict())
    fresh = PeerAiD(swa_start=0)
    fresh.load_state_dict(state)  # before either module is bound, as --resume does
    fresh.bind_average(tiny(5).double())
    fresh.bind_peer(tiny(6).double())
    assert (fresh.swa_n, fresh.swa_best_acc) == (1, 0.25) and fresh._pending is None
    for k, v in method.average.state_dict().items():
        assert torch.equal(fresh.average.state_dict()[k], v), k
    weights = state["swa"]["model"]
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    for bad in ({"n": -1}, {"best_acc": 2.0}, {"n": True}, {"model": nan}):
        broken = copy.deepcopy(state)
        broken["swa"].update(bad)
        with pytest.raises(ValueError, match="SWA"):
            fresh.load_state_dict(broken)


# ---- defaults and their sources --------------------------------------------------------------------------


def test_defaults_are_the_cited_official_values():
    assert get("peeraid") is PeerAiD and get("PeerAiD") is PeerAiD and "peeraid" in methods.names()
    assert not PeerAiD.needs_teacher and PeerAiD.LOSS_PER_ELEMENT
    d = PeerAiD().hparams()
    # main.py:131, 134, 29; attack_function.py:72; training_scripts/resnet18_cifar10.sh; configs/*.json
    assert d == dict(eps=8 / 255, step_size=2 / 255, steps=10, init_std=0.001, temperature=5.0, lamb1=0.0,
                     lamb2=1.0, lamb3=1.0, gamma1=1.0, gamma2=0.1, tau=1.0, peer_lr=0.1,
                     peer_weight_decay=2e-4, swa=True, swa_start=-1)  # fmt: skip
    assert PeerAiD.official_setting("resnet18", "cifar100")[1]["gamma2"] == 1.0  # resnet18_cifar100.sh
    s = PeerAiD.SCHEDULE  # configs/PeerAiD_resnet18_cifar10.json, main.py:220, 840-852
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay) == (300, 128, 0.1, 0.9, 2e-4)
    assert (s.milestones, s.gamma) == ((214, 259, 284), 0.1)
    assert [PeerAiD().peer_lr_at(e) for e in (0, 213, 214, 259, 284)] == pytest.approx([0.1, 0.1, 0.01, 1e-3, 1e-4])
    assert "main.py:131" in PeerAiD.HPARAMS["eps"].help and "attack_function.py:72" in PeerAiD.HPARAMS["init_std"].help
    assert "--gamma2 0.1" in PeerAiD.HPARAMS["gamma2"].help and "lr_peer" in PeerAiD.HPARAMS["peer_lr"].help
    assert "--swa_s" in PeerAiD.HPARAMS["swa"].help and "main.py:110-111" in PeerAiD.HPARAMS["swa_start"].help
    for key in ("jaewonalive/PeerAiD", "train_kd", "LinfPeerAttack", "SWA", "main.py:427-432"):
        assert key in peeraid_module.__doc__, key


@pytest.mark.parametrize(
    "overrides",
    [{"temperature": 0}, {"gamma2": -1}, {"peer_lr": "x"}, {"steps": 1.5}, {"swa": "maybe"}, {"swa_start": -2}],
)
def test_bad_hparams_are_user_errors(overrides):
    with pytest.raises(UserError):
        PeerAiD(**overrides)


def test_command_line_resolution_and_help():
    parse = train.build_parser().parse_args
    cfg = train.resolve_config(parse(["--method", "peeraid", "--student", "resnet18"]))
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.milestones, cfg.batch_size) == (
        300,
        0.1,
        2e-4,
        [214, 259, 284],
        128,
    )
    assert cfg.hparams == PeerAiD().hparams() and cfg.teacher is None
    cfg = train.resolve_config(parse(["--method", "peeraid", "--student", "resnet18", "--dataset", "cifar100"]))
    assert cfg.hparams["gamma2"] == 1.0
    text = train.build_parser().format_help()
    assert "--peer-lr" in text and "--gamma2" in text and "resnet18_cifar10.sh" in text


def _parts(*argv):
    """The resolved config of `train ARGV` and its built parts (the student's and the peer's SGD)."""
    from rslad_fast.engine.build import build_parts

    cfg = train.resolve_config(train.build_parser().parse_args(["--method", "peeraid", "--student", "tiny", *argv]))
    parts = build_parts(cfg, torch.device("cpu"), None, generator_seed=0)
    (student,), (peer,) = parts.optimizer.param_groups, parts.method.peer_optimizer.param_groups
    return cfg, (student["lr"], student["weight_decay"]), (peer["lr"], peer["weight_decay"])


@pytest.mark.parametrize(
    "argv, student_wd, peer_wd",
    [
        ([], 2e-4, 2e-4),  # configs/*.json weight_decay 0.0002 for both
        (["--weight-decay", "5e-4"], 5e-4, 5e-4),  # main.py:219-220: one args.weight_decay for both optimizers
        (["--weight-decay", "5e-4", "--peer-weight-decay", "1e-3"], 5e-4, 1e-3),  # the peer's own flag wins
        (["--peer-weight-decay", "0"], 2e-4, 0.0),
        (["--preset", "quick", "--weight-decay", "5e-4"], 5e-4, 5e-4),
    ],
)
def test_the_peer_follows_the_runs_weight_decay_unless_its_flag_is_given(argv, student_wd, peer_wd):
    cfg, student, peer = _parts(*argv)
    assert cfg.weight_decay == student[1] == pytest.approx(student_wd)
    assert cfg.hparams["peer_weight_decay"] == peer[1] == pytest.approx(peer_wd)
    assert PeerAiD.HPARAMS["peer_weight_decay"].default == PeerAiD.SCHEDULE.weight_decay  # one official value


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_the_quick_preset_scales_the_students_lr_not_the_peers(dataset, classes):
    """per_image_loss_lr turns the student's per-logit KL means into per-image ones (lr x C, weight decay / C);
    the peer's loss is mainly gamma1 * CE, already per image, so it keeps the official lr 0.1 and weight decay
    2e-4 (the module doc); its lr still decays at the run's milestones."""
    cfg, student, peer = _parts("--preset", "quick", "--dataset", dataset)
    assert student == (pytest.approx(0.1 * classes), pytest.approx(2e-4 / classes))
    assert peer == (pytest.approx(0.1), pytest.approx(2e-4)) and cfg.hparams["peer_lr"] == 0.1
    method = PeerAiD(**cfg.hparams)
    method.follow_lr_schedule(cfg.milestones, cfg.gamma)
    assert method.peer_lr_at(cfg.epochs - 1) == pytest.approx(0.1 * cfg.gamma) and cfg.milestones == [cfg.epochs - 1]
    assert "per_image_loss_lr" in peeraid_module.__doc__ and "main.py:219-220" in peeraid_module.__doc__


# ---- end to end ------------------------------------------------------------------------------------------

COMMON = ["--student", "tiny", "--threads", "1", "--eval-n", "32", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=32, seed=2)


def _args(data, out):
    return ["--method", "peeraid", "--preset", "quick", "--train-n", "256", "--epochs", "2", "--milestones", "1",
            "--data", str(data), "--out", str(out), *COMMON]  # fmt: skip


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("peeraid") / "run"
    assert train.main(_args(data, out)) == 0
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_quick_end_to_end(straight):
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["method"] == "peeraid" and cfg["teacher"] is None
    recs = _records(straight)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert all(k in r for k in ("train_loss", "train_loss_peer", "train_loss_student", "train_peer_acc_adv"))
        assert 0.0 < r["train_loss"] < float("inf") and 0.0 <= r["pgd20_acc"] <= r["clean_acc"] <= 1.0
    ck = torch.load(straight / "last.pt", weights_only=True)
    assert set(ck["method"]) == {"peer", "optimizer", "swa"}
    assert ck["method"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)  # decayed at milestone 1


def test_swa_student_files_and_records(straight, data):
    """Epoch 2 (from 0: 1, the milestone) made the SWA student: its first average is the student's weights,
    its BatchNorm statistics those of main.py's bn_update over its own pass of augmented training images;
    metrics.jsonl has its accuracy from then on; swa_best.pt and swa_last.pt hold it."""
    from rslad_fast.data import make_loader
    from rslad_fast.data.loaders import SALT_AVERAGE, mix_seed

    recs = _records(straight)
    assert "swa_pgd20_acc" not in recs[0]
    assert recs[1]["swa_best"] is True and 0.0 <= recs[1]["swa_pgd20_acc"] <= recs[1]["swa_clean_acc"] <= 1.0
    last, swa = (torch.load(straight / n, weights_only=True) for n in ("last.pt", "swa_last.pt"))
    best_swa = torch.load(straight / "swa_best.pt", weights_only=True)
    assert swa["epoch"] == best_swa["epoch"] == 2 and last["method"]["swa"]["n"] == 1
    # its own best; no method state (last.pt holds it, with the peer: these files are never resumed from)
    assert swa["best_acc"] == best_swa["best_acc"] == recs[1]["swa_pgd20_acc"] and swa["method"] == {}
    assert last["method"]["swa"]["best_acc"] == recs[1]["swa_pgd20_acc"]
    cfg = train.resolve_config(train.build_parser().parse_args(_args(data, straight.parent / "unused")))
    official = models.build("tiny", C)
    official.load_state_dict(last["model"])  # n = 0: alpha 1, the student's parameters
    seed = mix_seed(cfg.seed, SALT_AVERAGE)
    loader = make_loader("torch", *prepare(cfg).train, cfg.batch_size, train=True, seed=seed)
    loader.set_epoch(1)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format  # the run's memory format
    official_bn_update(((x.contiguous(memory_format=fmt), y) for x, y in loader), official.to(memory_format=fmt))
    for key, value in _averaged_state(official).items():
        torch.testing.assert_close(swa["model"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert not torch.equal(swa["model"]["bn1.running_mean"], last["model"]["bn1.running_mean"])


def test_swa_off_trains_the_same_student_and_writes_no_swa_files(straight, data, tmp_path):
    """--no-swa: the same student bitwise (the SWA student takes nothing from the training streams or the
    student's evaluation), and no swa_ file, record or state."""
    out = tmp_path / "noswa"
    assert train.main([*_args(data, out), "--no-swa"]) == 0
    assert not list(out.glob("swa_*")) and not any("swa_best" in r for r in _records(out))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, out))
    assert "swa" not in b["method"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    keep = ("train_loss", "clean_acc", "pgd20_acc")
    assert [{k: r[k] for k in keep} for r in _records(straight)] == [{k: r[k] for k in keep} for r in _records(out)]


def test_export_and_evaluate_take_the_swa_student(straight, tmp_path):
    from rslad_fast import evaluate
    from rslad_fast.export import ExportSettings, export

    result = export(
        ExportSettings(run=str(straight), ckpt="swa_last", formats=["exported"], n=16, out=str(tmp_path / "x")),
        log=lambda _: None,
    )
    assert result.files["exported"].is_file() and result.metadata["checkpoint"].endswith("swa_last.pt")
    report = tmp_path / "ev"
    argv = ["--run", str(straight), "--attacks", "clean", "--n", "16", "--out", str(report), "--no-progress"]
    assert evaluate.main(argv) == 0
    labels = [r["label"] for r in json.loads((report / "eval.json").read_text())["rows"]]
    assert labels == ["best", "last", "swa_best", "swa_last"]


def test_resume_is_bitwise_identical(straight, data, tmp_path):
    resumed = tmp_path / "resumed"
    args = _args(data, resumed)
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
    for key in a["method"]["peer"]:
        assert torch.equal(a["method"]["peer"][key], b["method"]["peer"][key]), key
    for sa, sb in zip(a["method"]["optimizer"]["state"].values(), b["method"]["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    for name in ("swa_last.pt", "swa_best.pt"):  # the SWA student continues bitwise too
        sa, sb = (torch.load(d / name, weights_only=True)["model"] for d in (straight, resumed))
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)
    assert a["method"]["swa"]["n"] == b["method"]["swa"]["n"] == 1
    timing = ("epoch_time_s", "eval_time_s", "swa_eval_time_s", "images_per_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]  # noqa: E731
    assert strip(_records(straight)) == strip(_records(resumed))


def test_reproduce_sweeps_peeraid(data, tmp_path):
    """`reproduce --methods peeraid`: no teacher run; the PeerAiD run trains, is evaluated and tabled."""
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--methods", "peeraid", "--students", "tiny", "--preset", "quick", "--no-progress"]
    argv += ["--train-n", "128", "--epochs", "2", "--eval-n", "32", "--batch-size", "64", "--threads", "1"]
    argv += ["--attacks", "clean,pgd20-sat", "--n", "32", "--data", str(data)]
    assert reproduce.main(argv) == 0
    assert json.loads((out / "plan.json").read_text())["runs"] == ["peeraid-tiny"]
    assert json.loads((out / "peeraid-tiny" / "eval.json").read_text())["n"] == 32
    assert "PeerAiD" in (out / "table2.md").read_text()
    # the quick preset's milestone is its last epoch: the SWA student was made there, evaluated and tabled
    rows = json.loads((out / "peeraid-tiny" / "eval.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["best", "last", "swa_best", "swa_last"]
    assert rows[2]["selection"] == rows[0]["selection"] and "swa_best" in (out / "table2.md").read_text()


def test_two_processes_match_one_process_with_the_combined_batch(tmp_path, monkeypatch, fake_cifar10):
    """Under torchrun (2 processes, gloo) the student AND the peer train as in one process with the combined
    batch: the peer's gradients are averaged over the processes before its step. tests/test_dist.py's worker
    and conditions: no BatchNorm (the peer is built by the same patched builder), no augmentation, x' from x."""
    from test_dist import COMMON as DIST_COMMON
    from test_dist import HERE, _patch, _torchrun

    data = fake_cifar10(n_train=128, n_test=16, seed=2)
    method = ["--method", "peeraid", "--student", "tiny", "--init-std", "0", "--steps", "2", "--data", str(data)]
    method += ["--epochs", "2", "--milestones", "1", *DIST_COMMON]
    two, one = tmp_path / "two", tmp_path / "one"
    res = _torchrun([str(HERE), "--no-bn", "--no-augment", "--", *method, "--batch-size", "16", "--out", str(two)])
    assert res.returncode == 0, res.stdout + res.stderr
    _patch(monkeypatch.setattr, no_bn=True, no_augment=True)
    assert train.main([*method, "--batch-size", "32", "--out", str(one)]) == 0
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (two, one))
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    for key in a["method"]["peer"]:
        torch.testing.assert_close(a["method"]["peer"][key], b["method"]["peer"][key], rtol=1e-5, atol=1e-6, msg=key)
    for x, y in zip(_records(two), _records(one)):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
