"""The evaluation attacks (FGSM, PGD_SAT, PGD_TRADES, CW-inf) and the AutoAttack adapter.

One tiny model is trained once per module (a few seconds) on the synthetic CIFAR-10 stand-in, average-pooled
to 16x16 (the tiny CNN pools globally, the attacks do not care about the size, and it is 4x cheaper on a
shared 2-core CPU) with a random contrast per image in [0.15, 0.6]: low-contrast images sit close to the
decision boundary, so robust accuracy at eps 8/255 is intermediate (about 40-45% with ~95% clean), which
makes "the attack lowers accuracy" and the torchattacks cross-check meaningful rather than 0 or 100.
"""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from rslad_fast.attacks.eval_attacks import EPS, FGSM, PGD, CWInf, cw_loss, pgd20_sat, pgd20_trades
from rslad_fast.attacks.registry import PRESETS
from rslad_fast.data import load_cifar10
from rslad_fast.errors import UserError

SIZE = 16
N_TEST = 200
pytestmark = pytest.mark.usefixtures("one_thread")


def _prep(root, train, seed):
    x, y = load_cifar10(root, train=train, download=False)
    x = F.avg_pool2d(x.float() / 255, 32 // SIZE)
    g = torch.Generator().manual_seed(seed)
    contrast = 0.15 + 0.45 * torch.rand(len(y), 1, 1, 1, generator=g)
    return (0.5 + (x - 0.5) * contrast).contiguous(), y


@pytest.fixture(scope="module")
def trained(fake_cifar10, train_tiny):
    root = fake_cifar10(n_train=500, n_test=N_TEST, seed=0)
    xtr, ytr = _prep(root, True, 1)
    xte, yte = _prep(root, False, 2)
    model, _ = train_tiny(xtr, ytr, steps=100, batch=64, lr=0.1)
    model.zero_grad(set_to_none=True)  # attacks must not leave parameter gradients: start from none
    return model.eval(), xte, yte


def _acc(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def results(trained):
    """Accuracy under each attack at its defaults (eps 8/255), on the first 100 test images."""
    model, x, y = trained
    x, y = x[:100], y[:100]
    out = {"clean": _acc(model, x, y)}
    for name, factory in PRESETS.items():
        out[name] = _acc(model, factory()(model, x, y, generator=_gen()), y)
    return out


# ----------------------------------------------------------------------------- defaults and their sources


def test_defaults_are_the_official_evaluation_settings():
    assert EPS == 8 / 255
    assert FGSM().hparams() == {"eps": 8 / 255, "alpha": 8 / 255, "steps": 1, "start": "none", "loss": "ce"}
    assert pgd20_sat().hparams() == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 20, "start": "uniform", "loss": "ce"}
    assert pgd20_trades().hparams() == {"eps": 8 / 255, "alpha": 0.003, "steps": 20, "start": "uniform", "loss": "ce"}
    assert CWInf().hparams() == {
        "eps": 8 / 255,
        "alpha": 2 / 255,
        "steps": 30,
        "kappa": 50.0,
        "start": "uniform",
        "loss": "cw",
    }
    assert (pgd20_sat().name, pgd20_trades().name, CWInf().name, FGSM().name) == (
        "pgd20-sat",
        "pgd20-trades",
        "cw",
        "fgsm",
    )
    assert set(PRESETS) == {"fgsm", "pgd20-sat", "pgd20-trades", "cw"}


@pytest.mark.parametrize(
    "kwargs", [dict(eps=-0.1), dict(eps=1.5), dict(alpha=-1.0), dict(steps=-1), dict(steps=2.5), dict(start="gaussian")]
)
def test_bad_hyperparameters_are_user_errors(kwargs):
    with pytest.raises(UserError):
        PGD(**kwargs)
    with pytest.raises(UserError):
        CWInf(kappa=-1.0)


def test_cw_loss_is_iads_cwloss():
    """Against the official formula, written out as in IAD's attack_generator.cwloss (CPU)."""
    g = _gen(3)
    logits = torch.randn(7, 10, generator=g) * 30
    y = torch.randint(0, 10, (7,), generator=g)
    onehot = torch.zeros(7, 10)
    onehot.scatter_(1, y.unsqueeze(1), 1.0)
    real = (onehot * logits).sum(1)
    other = ((1.0 - onehot) * logits - onehot * 10000.0).max(1)[0]
    expected = torch.sum(-torch.clamp(real - other + 50, min=0.0))
    assert torch.allclose(cw_loss(y, 50.0)(logits), expected)


# ----------------------------------------------------------------------------- behaviour on a trained model


def test_model_is_a_meaningful_target(results):
    assert results["clean"] >= 85
    assert 10 < results["pgd20-sat"] < 80  # neither trivially robust nor trivially broken


def test_each_attack_lowers_accuracy(results):
    for name in PRESETS:
        assert results[name] < results["clean"], (name, results)


def test_fgsm_is_weaker_than_pgd(results):
    assert results["fgsm"] >= results["pgd20-sat"]
    assert results["fgsm"] >= results["pgd20-trades"]


def test_larger_eps_lowers_accuracy_more(trained):
    model, x, y = trained
    x, y = x[:100], y[:100]
    accs = [
        _acc(model, pgd20_sat(eps=e, steps=10)(model, x, y, generator=_gen()), y) for e in (4 / 255, 8 / 255, 16 / 255)
    ]
    assert accs[0] > accs[1] > accs[2], accs


def test_eps_zero_returns_the_clean_images_exactly(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    for attack in (
        FGSM(eps=0),
        pgd20_sat(eps=0, steps=3),
        pgd20_trades(eps=0, steps=3),
        CWInf(eps=0, steps=3),
        PGD(eps=0, steps=3, start="normal"),
    ):
        x_adv = attack(model, x, y, generator=_gen())
        assert torch.equal(x_adv, x), attack


def test_perturbation_stays_in_the_threat_model(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    for attack in (FGSM(), pgd20_sat(steps=3), CWInf(steps=3)):
        x_adv = attack(model, x, y, generator=_gen())
        assert (x_adv - x).abs().max() <= attack.eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_fgsm_is_one_signed_step_of_eps(trained):
    model, x, y = trained
    x, y = x[:16].clone(), y[:16]
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    expected = torch.clamp(x + EPS * grad.sign(), 0, 1)
    assert torch.allclose(FGSM()(model, x, y), expected, atol=1e-7)


def test_fgsm_random_start_is_an_option_default_off(trained):
    """IAD's basic_eval.py runs its "FGSM without Random Start" with random=True (a uniform start, then one
    step of eps). Ours offers that start behind random_start=True; the default stays the standard FGSM."""
    model, x, y = trained
    x, y = x[:16].clone(), y[:16]
    assert FGSM().random_start is False
    assert torch.equal(FGSM()(model, x, y, generator=_gen(1)), FGSM(random_start=False)(model, x, y))
    rs = FGSM(random_start=True)
    assert rs.hparams() == {"eps": EPS, "alpha": EPS, "steps": 1, "start": "uniform", "loss": "ce"}
    noise = torch.rand(x.shape, generator=_gen(1))
    start = (x + (2 * noise - 1) * EPS).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    expected = torch.clamp(torch.min(torch.max(start.detach() + EPS * grad.sign(), x - EPS), x + EPS), 0, 1)
    x_adv = rs(model, x, y, generator=_gen(1))
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert not torch.equal(x_adv, FGSM()(model, x, y))
    assert torch.equal(x_adv, rs(model, x, y, generator=_gen(1)))
    with pytest.raises(UserError):
        FGSM(random_start="yes")


def test_seeded_generator_reproduces_and_modes_are_restored(trained):
    model, x, y = trained
    x, y = x[:16], y[:16]
    model.train()
    stats = model.bn1.running_mean.clone()
    try:
        a = pgd20_sat(steps=3)(model, x, y, generator=_gen(5))
        b = pgd20_sat(steps=3)(model, x, y, generator=_gen(5))
        c = pgd20_sat(steps=3)(model, x, y, generator=_gen(6))
        assert model.training and model.bn1.training  # modes given back
    finally:
        model.eval()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(model.bn1.running_mean, stats)  # the attack ran in eval mode: BN stats untouched
    assert all(p.grad is None for p in model.parameters())


def test_pgd20_agrees_with_torchattacks(trained):
    """Our PGD-20 (shared engine) vs torchattacks.PGD, same model and 200 images, fixed seeds: robust
    accuracies within 0.5 points. (torchattacks clamps the random start to [0, 1] before the first step,
    and draws it from the global RNG; the engine does neither, so they agree in number, not bit for bit.)"""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    ours = _acc(model, pgd20_sat()(model, x, y, generator=_gen(0)), y)
    torch.manual_seed(0)
    ref = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=20, random_start=True)(x, y)
    theirs = _acc(model, ref, y)
    assert abs(ours - theirs) <= 0.5, (ours, theirs)
    assert 10 < ours < _acc(model, x, y)  # a meaningful comparison, not 0 vs 0


# ----------------------------------------------------------------------------- AutoAttack adapter

STANDARD_AA = {
    "version": "standard",
    "norm": "Linf",
    "attacks_to_run": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "apgd-ce": {"n_iter": 100, "n_restarts": 1, "loss": "ce", "rho": 0.75, "eot_iter": 1},
    "apgd-t": {
        "n_iter": 100,
        "n_restarts": 1,
        "n_target_classes": 9,
        "loss": "dlr-targeted",
        "rho": 0.75,
        "eot_iter": 1,
    },
    "fab-t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
    "square": {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8},
}


def _aa_module():
    pytest.importorskip("pyautoattack", reason="pyautoattack==0.2.0 is not installed")
    import rslad_fast.attacks.autoattack as aa_mod

    return aa_mod


def test_autoattack_is_the_standard_version_with_explicit_device_and_eps(trained):
    aa_mod = _aa_module()
    model, _, _ = trained
    adversary = aa_mod.build_adversary(model, eps=8 / 255, device="cpu", seed=3)
    cfg = aa_mod.standard_config(adversary)
    assert {k: v for k, v in cfg.items() if k in STANDARD_AA} == STANDARD_AA
    assert aa_mod.STANDARD == STANDARD_AA
    assert cfg["eps"] == 8 / 255 and set(cfg["eps_per_attack"].values()) == {8 / 255}  # not the package's 0.3
    assert cfg["device"] == "cpu" and set(cfg["device_per_attack"].values()) == {"cpu"}
    assert cfg["seed"] == 3
    assert type(adversary).__module__.startswith("pyautoattack")  # never torchattacks' 10-iteration AA


def test_autoattack_version_is_checked(monkeypatch):
    aa_mod = _aa_module()
    monkeypatch.setattr(aa_mod.metadata, "version", lambda name: "0.1.0")
    with pytest.raises(UserError, match=r"pyautoattack==0\.2\.0"):
        aa_mod._require_pyautoattack()

    def missing(name):
        raise aa_mod.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(aa_mod.metadata, "version", missing)
    with pytest.raises(UserError, match="not installed"):
        aa_mod._require_pyautoattack()


def test_autoattack_end_to_end(trained):
    """The full standard AutoAttack on 8 images. At eps 0.25 APGD-CE breaks every image, and AutoAttack then
    skips its remaining attacks, so this runs in seconds (the four attacks on points that survive cost
    minutes on a CPU); it checks the adapter: eval mode and modes restored, logger routed and restored,
    per-image predictions, the threat model."""
    aa_mod = _aa_module()
    model, x, y = trained
    x, y = x[:8], y[:8]
    lines = []
    attack = aa_mod.AutoAttack(eps=0.25, seed=0, batch_size=8, log=lines.append, verbose=True)
    logger = logging.getLogger("auto-attack")
    before = (list(logger.handlers), logger.propagate, logger.level)
    tracer = lambda frame, event, arg: None  # noqa: E731 (stands for a debugger's or coverage's tracer)
    saved_trace = sys.gettrace()
    model.train()
    sys.settrace(tracer)
    try:
        x_adv, y_adv = attack.run(model, x, y)
        assert model.training
        assert sys.gettrace() is tracer  # pyautoattack's sys.settrace(None) was undone
    finally:
        sys.settrace(saved_trace)
        model.eval()
    assert (list(logger.handlers), logger.propagate, logger.level) == before
    assert (x_adv - x).abs().max() <= 0.25 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(model(x_adv).argmax(1), y_adv)
    assert (y_adv == y).sum() == 0  # eps 0.25 on low-contrast images: nothing survives
    assert any("running apgd-ce" in line for line in lines) and all(line.startswith("[autoattack]") for line in lines)
    assert attack.last_config["eps"] == 0.25


@pytest.mark.parametrize(
    "bad", [{"alpha": float("nan")}, {"alpha": float("inf")}, {"init_std": float("inf")}, {"init_std": float("nan")}]
)
def test_non_finite_step_and_start_are_refused(bad):
    """NaN slipped through `alpha < 0` / `not init_std >= 0`-style checks (inf passed the latter)."""
    from rslad_fast.attacks import eval_attacks
    from rslad_fast.attacks.pgd import check_budget
    from rslad_fast.errors import UserError

    kw = {**dict(eps=8 / 255, alpha=2 / 255, steps=2, start="normal", init_std=0.001), **bad}
    with pytest.raises(UserError, match="finite"):
        eval_attacks.PGD(**kw)
    if "alpha" in bad:
        with pytest.raises(ValueError, match="finite"):
            check_budget(8 / 255, bad["alpha"], 2)
