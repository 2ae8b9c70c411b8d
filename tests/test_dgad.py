"""DGAD (rslad_fast/methods/dgad.py) against a transcription of the official code, kunsaram01/DGAD:
`AT_helper.py` `adaad_inner_loss` (the attack) and `main.py`'s DGAD branch (lines 390-447, the loss), in
float64 on the `tiny` model; its defaults against the cited values; `train --method dgad` end to end on the
fake CIFAR-10 with the quick preset, resumed bitwise; `reproduce --methods dgad` planned.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rslad_fast import methods, models, ops, reproduce, train
from rslad_fast.engine import create_run_dir, prepare, run
from rslad_fast.engine.step import train_step
from rslad_fast.engine.teacher import cast_teacher, freeze
from rslad_fast.errors import UserError
from rslad_fast.methods import DGAD, Context, get
from rslad_fast.methods import dgad as dgad_module
from rslad_fast.models.fold import FoldedCopy

B, C = 8, 10
pytestmark = pytest.mark.usefixtures("one_thread")  # the test machine's cores are shared


def tiny(seed, num_classes=C):
    torch.manual_seed(seed)
    return models.build("tiny", num_classes)


@pytest.fixture(scope="module")
def setup64():
    """Student, teacher (another init), a batch with pixels on the box's faces, a fixed x', in float64. The
    labels: the teacher's own prediction on x for the first half (teacher right), another class for the rest
    (teacher wrong), so that both of DGAD's routes and both swaps are taken."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 32, 32, generator=g, dtype=torch.float64)
    x[0, 0, :4] = 0.0
    x[1, 1, :4] = 1.0
    x_adv = (x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    student, teacher = tiny(0).double(), tiny(1).double()
    with torch.no_grad():
        pred = copy.deepcopy(teacher).eval()(x).argmax(1)
    y = torch.where(torch.arange(B) < B // 2, pred, (pred + 1 + torch.arange(B) % (C - 1)) % C)
    return student, teacher, x, y, x_adv


def context(student, teacher, x, y, seed=0):
    with torch.no_grad():
        t_logits = copy.deepcopy(teacher).eval()(x)
    gen = torch.Generator().manual_seed(seed)
    return Context(student=student, x=x, y=y, teacher=teacher, teacher_logits=t_logits, generator=gen)


# ---- the official code, transcribed (torch.nn / F only) --------------------------------------------------


def official_inner_loss(model, teacher_model, x_natural, generator, step_size, steps, epsilon):
    """DGAD AT_helper.py adaad_inner_loss (BN_eval=True, random_init=True, clip 0..1), its randn drawn from
    `generator` (the official code: the global CUDA stream)."""
    criterion_kl = nn.KLDivLoss(reduction="none")
    model.eval()
    teacher_model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, generator=generator, dtype=x_natural.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = torch.sum(
                criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_model(x_adv), dim=1))
            )
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def official_loss(
    net, teacher_net, inputs, adv_inputs, targets, alp="on", alp_beta=1.0, model="resnet18", empty_adv_zero=False
):
    """main.py:394-447, the DGAD branch after the attack, with args.bs = the batch's size. `empty_adv_zero`:
    1/(B - n) replaced by 0 when n = B (where main.py raises ZeroDivisionError), the documented deviation."""
    bs = len(inputs)
    net.train()
    ori_outputs = net(inputs)
    adv_outputs = net(adv_inputs)
    KL_loss = nn.KLDivLoss(reduction="none")
    with torch.no_grad():
        teacher_net.eval()
        t_ori_outputs = teacher_net(inputs)
        t_adv_outputs = teacher_net(adv_inputs)
    Lambda = torch.zeros(inputs.size(0), dtype=inputs.dtype)
    t_misclassified_group = torch.argmax(t_ori_outputs, dim=1) != targets
    Lambda[t_misclassified_group] = 1.0
    num_lambda = Lambda.sum().item()
    ori_true_probs = torch.gather(t_ori_outputs, 1, targets.unsqueeze(1)).squeeze()
    ori_max_probs, ori_max_indices = torch.max(t_ori_outputs, dim=1)
    t_ori_outputs[t_misclassified_group, targets[t_misclassified_group]] = ori_max_probs[t_misclassified_group]
    t_ori_outputs[t_misclassified_group, ori_max_indices[t_misclassified_group]] = ori_true_probs[t_misclassified_group]
    correct_probs = torch.gather(t_adv_outputs, 1, targets.unsqueeze(1)).squeeze()
    max_probs, max_indices = torch.max((t_adv_outputs.scatter(1, targets.unsqueeze(1), -float("inf"))), dim=1)
    mask = correct_probs - max_probs < 0
    t_adv_outputs[mask, targets[mask]] = max_probs[mask]
    t_adv_outputs[mask, max_indices[mask]] = correct_probs[mask]
    loss_clean = (1 / (num_lambda + 1e-10)) * torch.sum(
        Lambda * KL_loss(F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1)).sum(dim=1)
    )
    num_adv = len(adv_inputs) - num_lambda
    loss_adv = (0.0 if empty_adv_zero and num_adv == 0 else 1 / num_adv) * torch.sum(
        (1 - Lambda) * KL_loss(F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1)).sum(dim=1)
    )
    if alp == "on":
        loss_alp = nn.MSELoss()(F.softmax(adv_outputs, dim=1), F.softmax(ori_outputs, dim=1))
        if model == "mobilenetV2":
            return 0.5 * ((num_lambda / bs) * loss_clean + ((bs - num_lambda) / bs)) * loss_adv + alp_beta * loss_alp
        return (num_lambda / bs) * loss_clean + ((bs - num_lambda) / bs) * loss_adv + alp_beta * loss_alp
    return (num_lambda / bs) * loss_clean + ((bs - num_lambda) / bs) * loss_adv


# ---- the attack ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"steps": 3, "eps": 16 / 255, "step_size": 4 / 255}])
def test_attack_equals_the_official_adaad_inner_loss(setup64, overrides):
    """x' from the same random start equals DGAD's adaad_inner_loss (main.py:391-392): both models in eval
    mode with grad during it, each module's mode given back, the objective raised."""
    student, teacher, x, y, _ = setup64
    method = DGAD(**overrides)
    S, T = copy.deepcopy(student).train(), copy.deepcopy(teacher).train()
    before = [m.training for m in S.modules()], [m.training for m in T.modules()]
    ctx = context(S, T, x, y, seed=4)  # before the hooks: its deepcopy of T would carry them
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
    assert modes == [("S", False, True), ("T", False, True)] * method.steps
    assert ([m.training for m in S.modules()], [m.training for m in T.modules()]) == before
    expected = official_inner_loss(
        copy.deepcopy(student), copy.deepcopy(teacher), x, torch.Generator().manual_seed(4),
        step_size=method.step_size, steps=method.steps, epsilon=method.eps,
    )  # fmt: skip
    assert not ours.requires_grad and ours.dtype == torch.float64
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12), (ours - expected).abs().max().item()
    assert (ours - x).abs().max() <= method.eps + 1e-12 and ours.min() >= 0 and ours.max() <= 1
    assert method.attack_objective(ctx, ours).item() > method.attack_objective(ctx, x).item()


# ---- the loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, official",
    [
        ({}, {}),
        ({"alp_beta": 0.3}, {"alp_beta": 0.3}),
        ({"alp": False}, {"alp": "off"}),
        ({"loss_form": "mobilenetv2"}, {"model": "mobilenetV2"}),
        ({"loss_form": "mobilenetv2", "alp": False}, {"model": "mobilenetV2", "alp": "off"}),
    ],
)
def test_loss_matches_main_py(setup64, overrides, official):
    """loss_at(x') equals main.py's DGAD loss: value, every parameter gradient and BatchNorm's running
    statistics (S(x) then S(x'), train mode); T(x') runs once, eval mode, no grad, and the teacher's mode and
    ctx.teacher_logits are left as they were (the swaps work on copies)."""
    student, teacher, x, y, x_adv = setup64
    method = DGAD(**overrides)
    ours_S, official_S = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    T = copy.deepcopy(teacher).train()
    ctx = context(ours_S, T, x, y)
    t_before = ctx.teacher_logits.clone()
    seen = []
    hook = T.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.is_grad_enabled())))
    try:
        loss = method.loss_at(ctx, x_adv)
    finally:
        hook.remove()
    assert seen == [(False, False)] and T.training and torch.equal(ctx.teacher_logits, t_before)
    loss.backward()
    expected = official_loss(official_S, copy.deepcopy(teacher), x, x_adv, y, **official)
    expected.backward()
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-14), (loss.item(), expected.item())
    for (name, p1), p2 in zip(ours_S.named_parameters(), official_S.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-8, atol=1e-14), name
    for (name, b1), b2 in zip(ours_S.named_buffers(), official_S.buffers()):
        assert torch.allclose(b1.double(), b2.double(), rtol=1e-12, atol=1e-14), name
    assert float(ctx.stats["loss"]) == pytest.approx(loss.item())
    assert float(ctx.stats["teacher_wrong"]) == pytest.approx(0.5)  # setup64: half the labels the teacher's
    assert {"loss_clean", "loss_adv", "acc_nat", "acc_adv"} <= set(ctx.stats)
    assert ("loss_alp" in ctx.stats) == method.alp


def test_mobilenetv2_total_of_shares_averages_to_the_whole_batchs(setup64):
    """The mobilenetv2 form under torchrun, two shares of the batch in one process: with the all-reduced sums
    (`totals`), each share's loss has the whole batch's value and the mean of the shares' gradients (DDP's) in
    the logits is the whole batch's gradient; each share's own product (what a process computed before) is
    neither. The logits are leaves, so BatchNorm plays no part."""
    _, teacher, x, y, x_adv = setup64
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        T = copy.deepcopy(teacher).eval()
        lam, t_nat, t_adv = dgad_module.dgad_targets(T(x), T(x_adv), y)
    s_nat = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    s_adv = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)

    def sums(rows):
        kl_nat = ops.softmax_kl(s_nat[rows], t_nat[rows], reduction="none")
        kl_adv = ops.softmax_kl(s_adv[rows], t_adv[rows], reduction="none")
        n = lam[rows].sum()
        return (lam[rows] * kl_nat).sum(), ((1 - lam[rows]) * kl_adv).sum(), n, float(len(rows))

    whole = dgad_module.mobilenetv2_total(*sums(torch.arange(B)))
    expected = torch.autograd.grad(whole, (s_nat, s_adv))
    shares = [torch.arange(0, B, 2), torch.arange(1, B, 2)]  # lambda 0 and 1 in both shares
    parts = [sums(rows) for rows in shares]
    totals = torch.stack([torch.stack([c.detach(), a.detach(), n, n.new_tensor(b)]) for c, a, n, b in parts]).sum(0)
    exact = [dgad_module.mobilenetv2_total(*part, totals, world=2) for part in parts]
    naive = [dgad_module.mobilenetv2_total(*part) for part in parts]
    for losses, same in ((exact, True), (naive, False)):
        grads = [torch.autograd.grad(loss, (s_nat, s_adv), allow_unused=True, retain_graph=True) for loss in losses]
        mean = [sum(g[i] if g[i] is not None else 0 for g in grads) / 2 for i in range(2)]
        close = all(torch.allclose(m, e, rtol=1e-10, atol=1e-14) for m, e in zip(mean, expected))
        assert close == same
        values = torch.stack([loss.detach() for loss in losses])
        assert torch.allclose(values, whole.detach().expand(2), rtol=1e-12) == same
    # the official line on the whole batch: 0.5 * ((n/bs) loss_clean + (bs - n)/bs) * loss_adv (main.py:439-442)
    c, a, n, b = sums(torch.arange(B))
    n = n.item()
    official = 0.5 * ((n / b) * (1 / (n + 1e-10)) * c + (b - n) / b) * ((1 / (b - n)) * a)
    assert torch.allclose(whole, official, rtol=1e-12)


def test_swaps_take_both_branches(setup64):
    """The fixture exercises what the loss test claims: rows of T(x) and of T(x') swapped and rows kept."""
    student, teacher, x, y, x_adv = setup64
    with torch.no_grad():
        T = copy.deepcopy(teacher).eval()
        t_nat, t_adv = T(x), T(x_adv)
    lam, t_nat_fixed, t_adv_fixed = dgad_module.dgad_targets(t_nat, t_adv, y)
    assert lam.tolist() == [0.0] * (B // 2) + [1.0] * (B - B // 2)
    changed_adv = (t_adv_fixed != t_adv).any(1)
    assert changed_adv.any() and not changed_adv.all()
    assert ((t_nat_fixed != t_nat).any(1) == lam.bool()).all()
    assert (t_nat_fixed.argmax(1) == y).all()  # the fixed T(x) is right on every row
    assert (t_adv_fixed.gather(1, y[:, None]).squeeze(1) >= t_adv_fixed.max(1).values).all()
    assert torch.equal(t_nat_fixed.sort(1).values, t_nat.sort(1).values)  # a swap: the same values


@pytest.mark.parametrize("loss_form, model", [("standard", "resnet18"), ("mobilenetv2", "mobilenetV2")])
@pytest.mark.parametrize("all_wrong", [True, False])
def test_a_batch_the_teacher_gets_all_wrong_or_all_right(setup64, all_wrong, loss_form, model):
    """n = B: the official 1/(B - n) raises ZeroDivisionError; here the empty adversarial term is 0: the loss,
    its gradients and BatchNorm's statistics are the transcription's with that 1/(B - n) replaced by 0. n = 0:
    the clean term is 0, and the official formula applies as it is."""
    student, teacher, x, _, x_adv = setup64
    with torch.no_grad():
        pred = copy.deepcopy(teacher).eval()(x).argmax(1)
    y = (pred + 1) % C if all_wrong else pred
    method = DGAD(loss_form=loss_form)
    S, S_off = copy.deepcopy(student).train(), copy.deepcopy(student).train()
    ctx = context(S, copy.deepcopy(teacher), x, y)
    loss = method.loss_at(ctx, x_adv)
    assert torch.isfinite(loss)
    if all_wrong:
        with pytest.raises(ZeroDivisionError):
            official_loss(copy.deepcopy(student).train(), copy.deepcopy(teacher), x, x_adv, y, model=model)
        assert float(ctx.stats["loss_adv"]) == 0.0 and float(ctx.stats["teacher_wrong"]) == 1.0
    else:
        assert float(ctx.stats["loss_clean"]) == 0.0
    expected = official_loss(S_off, copy.deepcopy(teacher), x, x_adv, y, model=model, empty_adv_zero=all_wrong)
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-14), (loss.item(), expected.item())
    loss.backward()
    expected.backward()
    for (name, p1), p2 in zip(S.named_parameters(), S_off.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-8, atol=1e-14), name
    for (name, b1), b2 in zip(S.named_buffers(), S_off.buffers()):
        assert torch.allclose(b1.double(), b2.double(), rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("teacher_dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_engine_step_with_folded_attack_copy_cast_teacher_and_autocast(teacher_dtype, amp):
    """One engine.step.train_step: the attack through the BN-folded copy of the student, a teacher in fp32,
    bf16 or fp16 weights, bf16 autocast or none: a finite float32 loss and a step taken."""
    S = tiny(0).to(memory_format=torch.channels_last)
    T = cast_teacher(freeze(tiny(1)), teacher_dtype)
    before = [p.detach().clone() for p in S.parameters()]
    opt = torch.optim.SGD(S.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, C, (8,))
    loss, ctx = train_step(
        S, DGAD(steps=2), opt, x, y, teacher=T, amp_dtype=amp, generator=torch.Generator().manual_seed(0),
        fold=FoldedCopy(S),
    )  # fmt: skip
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and float(ctx.stats["loss_alp"]) >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, S.parameters()))


# ---- defaults and their sources --------------------------------------------------------------------------


def test_defaults_are_the_cited_official_values():
    assert get("dgad") is DGAD and get("DGAD") is DGAD and "dgad" in methods.names() and DGAD.needs_teacher
    d = DGAD().hparams()
    # main.py:55-57 --epsilon 8 --num_steps 10 --step_size 2 (/255 at 391-392); AT_helper.py:27; main.py:42-43
    assert d == dict(eps=8 / 255, step_size=2 / 255, steps=10, init_std=0.001, alp=True, alp_beta=1.0,
                     loss_form="standard", cuda_graph="auto")  # fmt: skip
    assert "main.py:55" in DGAD.HPARAMS["eps"].help and "AT_helper.py:27" in DGAD.HPARAMS["init_std"].help
    assert "main.py:42" in DGAD.HPARAMS["alp_beta"].help and "main.py:43" in DGAD.HPARAMS["alp"].help
    assert "main.py:439-442" in DGAD.HPARAMS["loss_form"].help
    s = DGAD.SCHEDULE  # main.py:64-70, lr_decay 120-135
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay) == (200, 128, 0.1, 0.9, 5e-4)
    assert (s.milestones, s.gamma) == ((100, 150), 0.1) and "main.py:64-70" in s.source
    assert [DGAD().lr_at(e) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    # main.py:439-442: the MobileNetV2 student's total; no data-set-dependent term
    assert DGAD.official_setting("mnv2", "cifar10")[1]["loss_form"] == "mobilenetv2"
    assert DGAD.official_setting("resnet18", "cifar100")[1] == d
    assert DGAD().per_image_factor(10) == 1.0 and not DGAD.LOSS_PER_ELEMENT
    assert (DGAD.attack_mode, DGAD.attack_start, DGAD.TEACHER_CACHE_AUTO) == ("eval", "normal", False)
    for key in ("kunsaram01/DGAD", "main.py", "390-447", "AT_helper.py", "ZeroDivisionError", "args.bs"):
        assert key in dgad_module.__doc__, key


@pytest.mark.parametrize("overrides", [{"loss_form": "other"}, {"alp_beta": -1}, {"alp": "maybe"}, {"eps": 2}])
def test_bad_hparams_are_user_errors(overrides):
    with pytest.raises(UserError):
        DGAD(**overrides)


def test_hparams_from_strings_are_coerced():
    m = DGAD(alp="no", alp_beta="0.5", loss_form=" MobileNetV2 ")
    assert (m.alp, m.alp_beta, m.loss_form) == (False, 0.5, "mobilenetv2")


def test_command_line_resolution_and_help():
    parse = train.build_parser().parse_args
    base = ["--method", "dgad", "--teacher", "t.pt"]
    cfg = train.resolve_config(parse([*base, "--student", "resnet18"]))
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.milestones, cfg.batch_size) == (200, 0.1, 5e-4, [100, 150], 128)
    assert cfg.hparams == DGAD().hparams()
    cfg = train.resolve_config(parse([*base, "--student", "mnv2"]))
    assert cfg.hparams["loss_form"] == "mobilenetv2"
    cfg = train.resolve_config(parse([*base, "--student", "mnv2", "--loss-form", "standard", "--no-alp"]))
    assert (cfg.hparams["loss_form"], cfg.hparams["alp"]) == ("standard", False)
    text = train.build_parser().format_help()
    assert "--alp-beta" in text and "DGAD main.py:42" in text and "--loss-form" in text


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
        "--method", "dgad", "--preset", "quick", "--teacher", str(teacher_ckpt), "--teacher-arch", "tiny",
        "--train-n", "256", "--epochs", "2", "--data", str(data), "--out", str(out), *COMMON,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(data, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("dgad") / "run"
    assert train.main(_args(data, out, teacher_ckpt)) == 0
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_quick_end_to_end(straight):
    cfg = json.loads((straight / "config.json").read_text())
    quick = train.PRESETS["quick"]
    assert cfg["method"] == "dgad" and cfg["preset"] == "quick" and cfg["teacher"]["arch"] == "tiny"
    assert cfg["hparams"]["steps"] == quick.attack_steps
    assert cfg["hparams"]["step_size"] == pytest.approx(10 * 2 / 255 / quick.attack_steps)
    recs = _records(straight)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        keys = ("train_loss", "train_loss_adv", "train_loss_clean", "train_loss_alp", "clean_acc", "pgd20_acc")
        assert all(k in r for k in keys), sorted(r)
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


def test_reproduce_sweeps_dgad(data, tmp_path):
    """`reproduce --methods dgad`: the sweep trains its teacher, then DGAD from that file, and tables it."""
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--methods", "dgad", "--students", "tiny", "--teacher-arch", "tiny", "--preset"]
    argv += ["quick", "--no-progress", "--train-n", "128", "--epochs", "1", "--eval-n", "32", "--batch-size", "64"]
    argv += ["--threads", "1", "--attacks", "clean,pgd20-sat", "--n", "32", "--data", str(data)]
    assert reproduce.main(argv) == 0
    assert json.loads((out / "plan.json").read_text())["runs"] == ["teacher", "dgad-tiny"]
    cfg = json.loads((out / "dgad-tiny" / "config.json").read_text())
    assert cfg["method"] == "dgad" and cfg["teacher"]["path"] == str((out / "teacher" / "last.pt").resolve())
    assert json.loads((out / "dgad-tiny" / "eval.json").read_text())["n"] == 32
    assert "DGAD" in (out / "table2.md").read_text()


@pytest.mark.parametrize("loss_form", ["standard", "mobilenetv2"])
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path, monkeypatch, fake_cifar10, loss_form):
    """Under torchrun (2 processes, gloo) DGAD trains as one process with the combined batch: its standard
    total is a per-image mean plus a mean MSE, so the ranks' averaged gradients are the whole batch's; the
    mobilenetv2 form, a product of two batch means, all-reduces its sums first (the module doc).
    tests/test_dist.py's worker and conditions: no BatchNorm, no augmentation, x' from x."""
    from test_dist import COMMON as DIST_COMMON
    from test_dist import HERE, NoBN, _patch, _torchrun

    data = fake_cifar10(n_train=128, n_test=16, seed=2)
    torch.manual_seed(3)
    teacher = models.build("tiny")
    with torch.no_grad():
        teacher.linear.weight.mul_(30.0)  # confident soft labels, some right and some wrong
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    method = ["--method", "dgad", "--student", "tiny", "--teacher", str(tmp_path / "teacher.pt"), "--teacher-arch"]
    method += ["tiny", "--init-std", "0", "--steps", "2", "--data", str(data), "--epochs", "2", *DIST_COMMON]
    method += ["--loss-form", loss_form]
    two, one = tmp_path / "two", tmp_path / "one"
    res = _torchrun([str(HERE), "--no-bn", "--no-augment", "--", *method, "--batch-size", "16", "--out", str(two)])
    assert res.returncode == 0, res.stdout + res.stderr
    _patch(monkeypatch.setattr, no_bn=True, no_augment=True)
    assert train.main([*method, "--batch-size", "32", "--out", str(one)]) == 0
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (two, one))
    assert a["epoch"] == b["epoch"] == 2
    torch.manual_seed(0)  # the run's seed: its initial weights
    start = NoBN().state_dict()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
        assert (b["model"][key] - start[key]).abs().max() > 1e-3, key  # training moved it
    ra, rb = _records(two), _records(one)
    assert [r["world_size"] for r in ra] == [2, 2]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert 0.0 < x["train_teacher_wrong"] < 1.0  # both of DGAD's routes were taken
