"""The teacher-logit cache (engine/teacher_cache.py) and the loaders' view ids it keys on.

Tolerance: served logits and runs trained from them are compared with rtol 1e-5, atol 1e-6 (fp32). A hit
returns logits the teacher gave for that view in another batch, and kernels may round differently for
another batch size, so bitwise equality is not promised (on this CPU the logits come out bitwise anyway).
"""

import json
import math

import pytest
import torch
from crop_flip import chi2_uniform

from rslad_fast import engine, train
from rslad_fast.data import TensorLoader, apply_crop_flip, decode_views, num_views
from rslad_fast.engine import runner, teacher_cache
from rslad_fast.engine.config import Config
from rslad_fast.engine.step import teacher_logits, train_step
from rslad_fast.engine.teacher_cache import TeacherCache
from rslad_fast.methods import get
from rslad_fast.models import build

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-5, 1e-6
COMMON = [
    "--student",
    "tiny",
    "--threads",
    "1",
    "--eval-n",
    "16",
    "--batch-size",
    "32",
    "--no-progress",
    "--device",
    "cpu",
]


def _noise(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _teacher(seed=3):
    """A seeded tiny teacher, eval mode, its last layer scaled up for confident, clearly distinct logits."""
    torch.manual_seed(seed)
    t = build("tiny")
    with torch.no_grad():
        t.linear.weight.mul_(30.0)
    return t.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=128, n_test=16, seed=4)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(_teacher().state_dict(), path)
    return path


def _distill(method, data, out, teacher_ckpt, *extra):
    return [
        "--method",
        method,
        "--data",
        str(data),
        "--out",
        str(out),
        "--teacher",
        str(teacher_ckpt),
        "--teacher-arch",
        "tiny",
        "--steps",
        "2",
        "--epochs",
        "3",
        "--milestones",
        "2",
        *COMMON,
        *extra,
    ]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _no_augment(monkeypatch):
    """Training batches without crops and flips: one view per image, so every epoch after the first is all hits."""
    real = runner.make_loader
    monkeypatch.setattr(runner, "make_loader", lambda *a, **k: real(*a, **{**k, "augment": False}))


def _assert_close_runs(dir_a, dir_b):
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (dir_a, dir_b))
    assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=RTOL, atol=ATOL, msg=key)
    for (_, sa), (_, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=RTOL, atol=ATOL)


# ---- the loaders' view ids ------------------------------------------------------------------------------


def test_tensor_loader_views_name_each_images_crop_and_flip():
    x, y = _noise(40), torch.arange(40) % 10
    plain = TensorLoader(x, y, 16, train=True, seed=5)
    viewed = TensorLoader(x, y, 16, train=True, seed=5, with_views=True)
    assert viewed.num_views == num_views(4) == 162
    for e in (0, 3):
        plain.set_epoch(e), viewed.set_epoch(e)
        for (xa, ya), (xb, yb, views) in zip(list(plain), list(viewed)):  # the same batches, bitwise
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert views.dtype == torch.int64 and views.shape == ya.shape
            index, params = decode_views(views)
            assert torch.equal(y[index], yb)
            assert torch.equal(apply_crop_flip(x[index], params), (xb * 255).round().to(torch.uint8))
    flat = TensorLoader(x, y, 16, train=True, seed=5, augment=False, with_views=True)
    assert flat.num_views == 1
    assert torch.equal(torch.cat([v for _, _, v in flat]), flat.indices())  # no draw: the index is the view


def test_view_ids_are_uniform_over_the_162_views():
    """Chi-square of the view codes (index removed) against uniform over V = 162, p < 1e-6 (df 161, critical
    value by Wilson-Hilferty: 261.2)."""
    n, epochs = 512, 40
    loader = TensorLoader(_noise(n), torch.zeros(n, dtype=torch.long), 256, train=True, seed=6, with_views=True)
    codes = []
    for e in range(epochs):
        loader.set_epoch(e)
        codes += [v % 162 for _, _, v in loader]
    codes = torch.cat(codes)
    df, z = 161, 4.753  # one-sided normal quantile of 1e-6
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert codes.min() == 0 and codes.max() == 161
    assert chi2_uniform(codes, 162) < critical


# ---- the cache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_served_logits_equal_the_teachers_on_the_same_view(channels_last):
    teacher = _teacher()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=fmt)
    n = 48
    x_all = _noise(n, seed=1)
    loader = TensorLoader(
        x_all, torch.zeros(n, dtype=torch.long), 16, train=True, seed=2, padding=1, with_views=True
    )  # 18 views: hits and misses mixed within a few epochs
    cache = TeacherCache(n, loader.num_views, 10, "cpu")
    mixed = 0
    for e in range(6):
        loader.set_epoch(e)
        for x, _, views in loader:
            x = x.contiguous(memory_format=fmt)
            hits_before = cache.hits
            served = cache.logits(teacher, x, views)
            assert served.dtype == torch.float32 and served.shape == (16, 10)
            torch.testing.assert_close(served, teacher_logits(teacher, x), rtol=RTOL, atol=ATOL)
            mixed += 0 < cache.hits - hits_before < 16
    assert cache.lookups == 6 * n and 0 < cache.hits < cache.lookups and mixed > 0


def test_another_crop_or_flip_is_another_entry():
    teacher = _teacher()
    img = _noise(1, seed=7)
    cache = TeacherCache(1, num_views(4), 10, "cpu")
    from rslad_fast.data import CropFlipParams, view_ids

    def view(top, left, flip):
        p = CropFlipParams(torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]), 4)
        return apply_crop_flip(img, p).float() / 255, view_ids(torch.tensor([0]), p)

    shown = [view(4, 4, False), view(4, 4, True), view(0, 4, False), view(4, 5, False)]
    ids = torch.cat([v for _, v in shown])
    assert len(set(ids.tolist())) == 4
    served = [cache.logits(teacher, x, v) for x, v in shown]
    assert cache.hits == 0 and int(cache.filled.sum()) == 4
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(served[i], served[j], rtol=1e-3, atol=1e-3), (i, j)
    for (x, v), first in zip(shown, served):  # asked again: each view's own logits, from the table
        again = cache.logits(teacher, x, v)
        assert torch.equal(again, first)
        torch.testing.assert_close(again, teacher_logits(teacher, x), rtol=RTOL, atol=ATOL)
    assert cache.hits == 4


def test_hit_rate_after_k_epochs_follows_one_minus_one_minus_one_over_v_to_the_k():
    """Epoch k's hits (epochs from 0): each image hits when its view was drawn in one of the k earlier
    epochs, independently per image, so hits ~ Binomial(N, 1 - (1 - 1/162)^k). Checked at 3 epochs with
    exact binomial tails of 1e-7 each side (all checks together: p < 1e-6 of a false failure)."""
    n, epochs, v = 2048, 40, 162
    loader = TensorLoader(_noise(n, seed=8), torch.zeros(n, dtype=torch.long), 512, train=True, seed=9, with_views=True)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    cache = TeacherCache(n, v, 10, "cpu")
    hits = []
    for e in range(epochs):
        before = cache.hits
        loader.set_epoch(e)
        for x, _, views in loader:
            cache.logits(teacher, x, views)
        hits.append(cache.hits - before)
    assert hits[0] == 0
    for k in (5, 20, 39):
        p = 1 - (1 - 1 / v) ** k
        lo, hi = _binomial_interval(n, p, 1e-7)
        assert lo <= hits[k] <= hi, (k, hits[k], n * p, (lo, hi))
        # a numbering that lost the flip (81 views) would be far outside: the check can fail
        assert not lo <= n * (1 - (1 - 1 / 81) ** k) <= hi
    print("hit rates", {k: hits[k] / n for k in (1, 5, 20, 39)})


def _binomial_interval(n, p, tail):
    """The smallest [lo, hi] with P(X < lo) <= tail and P(X > hi) <= tail, X ~ Binomial(n, p) (exact)."""
    logpmf = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
        for k in range(n + 1)
    ]
    pmf = [math.exp(v) for v in logpmf]
    lo, acc = 0, 0.0
    while acc + pmf[lo] <= tail:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while acc + pmf[hi] <= tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


def test_iad_teacher_on_x_adv_is_never_served_from_the_cache():
    """From the epoch IAD introspects, its teacher also sees x' (the reliability A_i): that forward always runs
    (through ctx.teacher), only T(x) comes from the cache. Spied on the teacher's inputs."""
    teacher = _teacher()
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(0)
    student = build("tiny")
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    method = get("iad")(begin=0, steps=1)
    n = 32
    loader = TensorLoader(_noise(n, seed=10), torch.arange(n) % 10, 16, train=True, augment=False, with_views=True)
    cache = TeacherCache(n, 1, 10, "cpu")
    g = torch.Generator().manual_seed(0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y, views in loader:
            seen.clear()
            train_step(student, method, opt, x, y, teacher=teacher, epoch=epoch, generator=g, cache=cache, views=views)
            if epoch == 0:  # a miss: T(x) on x, then T(x') on x'
                assert len(seen) == 2 and torch.equal(seen[0], x) and not torch.equal(seen[1], x)
            else:  # T(x) served; T(x') still computed, on x'
                assert len(seen) == 1 and not torch.equal(seen[0], x)
                assert (seen[0] - x).abs().max() <= method.eps + 1e-6
    assert cache.hits == n


def test_train_step_refuses_a_cache_without_views():
    method = get("rslad")(steps=1)
    student = build("tiny")
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="view ids"):
        train_step(
            student,
            method,
            opt,
            torch.rand(2, 3, 32, 32),
            torch.zeros(2, dtype=torch.long),
            teacher=_teacher(),
            cache=TeacherCache(2, 1, 10, "cpu"),
        )


# ---- runs -----------------------------------------------------------------------------------------------


def test_a_cached_rslad_run_equals_an_uncached_one(data, teacher_ckpt, tmp_path, monkeypatch, capsys):
    _no_augment(monkeypatch)
    on, off = tmp_path / "on", tmp_path / "off"
    assert train.main(_distill("rslad", data, on, teacher_ckpt, "--teacher-cache", "on")) == 0
    out = capsys.readouterr().out
    assert "teacher-logit cache: 128 images x 1 views x 10 classes, 5 kB on cpu" in out
    assert "teacher cache 100.0% hits, 128 forwards saved" in out
    assert train.main(_distill("rslad", data, off, teacher_ckpt, "--teacher-cache", "off")) == 0
    _assert_close_runs(on, off)
    r_on, r_off = _records(on), _records(off)
    assert [r["teacher_cache_hit_rate"] for r in r_on] == [0.0, 1.0, 1.0]
    assert [r["teacher_forwards_saved"] for r in r_on] == [0, 128, 128]
    assert not any("teacher_cache_hit_rate" in r for r in r_off)
    for a, b in zip(r_on, r_off):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert json.loads((on / "config.json").read_text())["teacher_cache"] == "on"


def test_resume_with_the_cache_equals_the_uninterrupted_cached_run(data, teacher_ckpt, tmp_path, monkeypatch):
    _no_augment(monkeypatch)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(_distill("rslad", data, straight, teacher_ckpt)) == 0  # auto: on for RSLAD
    args = _distill("rslad", data, resumed, teacher_ckpt)
    cfg = train.resolve_config(train.build_parser().parse_args(args))
    prep = engine.prepare(cfg)
    assert prep.teacher_cache
    engine.create_run_dir(resumed, cfg).close()
    engine.run(prep, resumed, progress=False, stop_after=1)
    assert train.main(["--resume", str(resumed), "--no-progress"]) == 0
    _assert_close_runs(straight, resumed)
    # the cache is not in last.pt: the resumed process refills it in its first epoch
    assert [r["teacher_cache_hit_rate"] for r in _records(straight)] == [0.0, 1.0, 1.0]
    assert [r["teacher_cache_hit_rate"] for r in _records(resumed)] == [0.0, 0.0, 1.0]
    assert not any("cache" in k for k in torch.load(resumed / "last.pt", weights_only=True))


def test_auto_per_method_and_on_without_a_teacher_is_an_error(data, teacher_ckpt, tmp_path, capsys):
    def resolved(method, *extra):
        cfg = train.resolve_config(
            train.build_parser().parse_args(_distill(method, data, tmp_path / method, teacher_ckpt, *extra))
        )
        return cfg.teacher_cache, engine.prepare(cfg).teacher_cache

    assert resolved("rslad") == ("auto", True) and resolved("ard") == ("auto", True)
    assert resolved("iad") == ("auto", False)  # its teacher also sees x': off unless asked for
    assert resolved("iad", "--teacher-cache", "on") == ("on", True)
    assert resolved("rslad", "--teacher-cache", "off") == ("off", False)
    rc = train.main(
        [
            "--method",
            "natural",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "nat"),
            "--epochs",
            "1",
            "--teacher-cache",
            "on",
            *COMMON,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2 and len(err) == 1 and err[0].startswith("error: --teacher-cache on") and "without a teacher" in err[0]
    )
    assert not (tmp_path / "nat").exists()


def test_a_cache_that_does_not_fit(data, teacher_ckpt, tmp_path, monkeypatch, capsys):
    """on: one error line before anything is written; auto: a note, and the run trains uncached."""
    monkeypatch.setattr(teacher_cache, "free_bytes", lambda device: 1_000_000)  # 1 MB free
    rc = train.main(_distill("rslad", data, tmp_path / "on", teacher_ckpt, "--teacher-cache", "on"))
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2
        and len(err) == 1
        and err[0].startswith("error: --teacher-cache on: the teacher-logit cache needs 850 kB")
    ), err  # 128 x 162 x 41 bytes
    assert "--teacher-cache off" in err[0] and not (tmp_path / "on").exists()
    auto = tmp_path / "auto"
    assert train.main(_distill("rslad", data, auto, teacher_ckpt, "--epochs", "1")) == 0
    assert "training without it (--teacher-cache auto)" in capsys.readouterr().out
    assert not any("teacher_cache_hit_rate" in r for r in _records(auto))


def test_configs_without_the_field_resume_uncached(tmp_path, capsys):
    """config.json of runs written before --teacher-cache existed: read as "off", what they trained with; and
    --resume refuses the flag like any other setting."""
    from rslad_fast.engine.config import same_run as _same_run

    d = train.resolve_config(
        train.build_parser().parse_args(
            ["--method", "rslad", "--student", "tiny", "--teacher", "x.pt", "--device", "cpu"]
        )
    ).to_dict()
    old = {k: v for k, v in d.items() if k != "teacher_cache"}
    assert Config.from_dict(old).teacher_cache == "off"
    assert _same_run(old, {**d, "teacher_cache": "off"}) and not _same_run(old, d)  # d: "auto"
    assert train.main(["--resume", str(tmp_path), "--teacher-cache", "on"]) == 2
    assert "drop --teacher-cache" in capsys.readouterr().err
