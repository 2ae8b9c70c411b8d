"""CIFAR-100 end to end on generated data in the official ``cifar-100-python/{train,test,meta}`` layout: the
reader and its refusals, every method trained a few steps, RSLAD's official CIFAR-100 loss, the teacher's
precision and class count, resume, every evaluation attack, and the official CIFAR-100 architectures
(zibojia/RSLAD ``cifar100_models/``) loading into ours with the same logits."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_cifar import write_fake_cifar10, write_fake_cifar100

from rslad_fast import evaluate, methods, train
from rslad_fast.data import cifar, load_cifar, load_cifar100
from rslad_fast.engine import create_run_dir, prepare, run
from rslad_fast.engine.config import Config
from rslad_fast.engine.teacher import CastTeacher, cast_teacher
from rslad_fast.errors import UserError
from rslad_fast.models import build
from rslad_fast.models.loading import load_checkpoint_into
from rslad_fast.models.wrn_dm import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DMWideResNet

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--dataset", "cifar100", "--student", "tiny", "--threads", "1", "--eval-n", "16", "--no-progress"]
COMMON += ["--no-download", "--batch-size", "32", "--train-n", "64", "--epochs", "1"]
DISTILL = ("rslad", "ard", "iad", "adaad", "mtard", "dgad")


@pytest.fixture(scope="module")
def data(fake_cifar100):
    return fake_cifar100(n_train=200, n_test=100, seed=3)


@pytest.fixture(scope="module")
def teacher_ckpt(data, natural_teacher):
    """A naturally trained 100-class tiny teacher (our last.pt format)."""
    return natural_teacher(data, *COMMON)


def _args(method, data, out, teacher_ckpt, *extra):
    args = ["--method", method, "--data", str(data), "--out", str(out), *COMMON, *extra]
    if "steps" in methods.get(method).HPARAMS:
        args += ["--steps", "2"]
    if method in DISTILL:
        args += ["--teacher", str(teacher_ckpt), "--teacher-arch", "tiny"]
    if method == "mtard":  # its natural teacher (the same file serves: the test is the class count)
        args += ["--nat-teacher", str(teacher_ckpt), "--nat-teacher-arch", "tiny"]
    return args


def _error(capsys, argv, module=train) -> str:
    """The one stderr line of a refused command (status 2, no traceback, nothing else)."""
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- the reader


def test_reader_reads_the_official_layout(tmp_path):
    folder = write_fake_cifar100(tmp_path, n_train=300, n_test=100, seed=0)
    d = pickle.loads((folder / "train").read_bytes(), encoding="bytes")
    x, y = load_cifar100(tmp_path, train=True, download=False)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == list(d[b"fine_labels"]) and y.max() == 99  # fine labels, not the 20 coarse ones
    assert torch.equal(x.reshape(300, -1), torch.from_numpy(d[b"data"]))
    xt, yt = load_cifar(folder, train=False, dataset="cifar100", download=False)  # the folder itself works too
    assert xt.shape == (100, 3, 32, 32) and yt.shape == (100,)


@pytest.mark.parametrize("damage", ["label_100", "cifar10_keys", "no_meta", "meta_20", "truncated"])
def test_reader_refuses_a_broken_file_in_one_line(tmp_path, damage):
    folder = write_fake_cifar100(tmp_path, n_train=100, n_test=100, seed=0)
    f = folder / ("meta" if damage.startswith("meta") or damage == "no_meta" else "test")
    d = pickle.loads(f.read_bytes(), encoding="bytes")
    if damage == "label_100":
        d[b"fine_labels"] = [100] + d[b"fine_labels"][1:]
    elif damage == "cifar10_keys":  # a CIFAR-10 batch under CIFAR-100's name
        d[b"labels"] = d.pop(b"fine_labels")
    elif damage == "meta_20":
        d[b"fine_label_names"] = d[b"coarse_label_names"]
    f.write_bytes(pickle.dumps(d, protocol=2))
    if damage == "no_meta":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(UserError) as e:
        load_cifar100(tmp_path, train=False, download=False)
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg and "CIFAR-100" in msg
    assert {"label_100": "0..99", "cifar10_keys": "fine_labels", "meta_20": "fine_label_names"}.get(damage, "") in msg


def test_missing_offline_says_how_and_online_downloads_cifar100(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_online", lambda *a, **k: False)
    with pytest.raises(UserError, match=r"CIFAR-100 not found .*offline.*cifar-100-python\.tar\.gz"):
        load_cifar100(tmp_path / "nowhere", train=True)
    import torchvision

    calls = []

    def cifar100(root, train, download):  # stands in for torchvision's download
        calls.append((root, train, download))
        write_fake_cifar100(root, n_train=10, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", cifar100)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("CIFAR-10 downloaded"))
    x, _ = load_cifar100(tmp_path / "fresh", train=False, download=True)
    assert calls == [(str(tmp_path / "fresh"), False, True)] and x.shape == (10, 3, 32, 32)


def test_a_cifar10_folder_given_as_cifar100_and_the_reverse_are_one_error_each(tmp_path, capsys):
    c10, c100 = tmp_path / "c10", tmp_path / "c100"
    write_fake_cifar10(c10, n_train=64, n_test=16)
    write_fake_cifar100(c100, n_train=64, n_test=16)
    base = ["--method", "natural", "--student", "tiny", "--no-download", "--no-progress", "--out"]
    err = _error(capsys, [*base, str(tmp_path / "a"), "--dataset", "cifar100", "--data", str(c10)])
    assert "CIFAR-100 not found" in err and "holds CIFAR-10" in err and "--dataset cifar10 " in err
    err = _error(capsys, [*base, str(tmp_path / "b"), "--data", str(c100)])  # cifar10, the default
    assert "CIFAR-10 not found" in err and "holds CIFAR-100" in err and "--dataset cifar100 " in err
    # the other set's folder itself as --data (never downloaded into, even online), and a renamed folder
    err = _error(
        capsys, [*base, str(tmp_path / "c"), "--dataset", "cifar100", "--data", str(c10 / "cifar-10-batches-py")]
    )
    assert "holds CIFAR-10" in err
    (c10 / "cifar-10-batches-py").rename(c10 / "cifar-100-python")
    err = _error(capsys, [*base, str(tmp_path / "d"), "--dataset", "cifar100", "--data", str(c10)])
    assert "not CIFAR-100's official layout" in err and "--dataset cifar10 " in err
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing written
    err = _error(capsys, ["--ckpt", str(tmp_path), "--arch", "tiny", "--dataset", "cifar100"], evaluate)
    assert "not a file" in err


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("method", methods.names())
def test_every_method_trains_on_cifar100(method, data, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    extra = ("--begin", "0") if method == "iad" else ()  # IAD's teacher-weighted phase from the first batch
    assert train.main(_args(method, data, out, teacher_ckpt, *extra)) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "cifar100"
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["model"]["linear.weight"].shape == (100, 32) and ck["epoch"] == 1
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"]) and 0.0 <= record["pgd20_acc"] <= record["clean_acc"] <= 1.0
    if method in DISTILL:
        assert cfg["teacher"]["dtype"] == "fp16"  # the official CIFAR-100 scripts' teacher.half()


def _resolved(*argv):
    return train.resolve_config(train.build_parser().parse_args(["--device", "cpu", *argv]))


def test_rslad_cifar100_defaults_are_the_official_scripts_and_its_loss_their_formula(monkeypatch):
    from rslad_fast.engine import resolution

    # the official defaults, as on a CPU without native bf16 (where it has it, a WRN-34-10 teacher on the CPU
    # is bf16 by engine/presets.py CPU_CHOICES: tests/test_engine_api.py)
    monkeypatch.setattr(resolution, "cpu_info", lambda: {"model": "test", "flags": [], "native_bf16": False})
    c10, c100 = _resolved("--teacher", "t.pt"), _resolved("--teacher", "t.pt", "--dataset", "cifar100")
    assert (c10.hparams["kl_scale"], c10.hparams["log_of_softmax"]) == (1.0, False)
    assert (c100.hparams["kl_scale"], c100.hparams["log_of_softmax"]) == (10.0, True)
    assert (c10.teacher["arch"], c100.teacher["arch"]) == ("wrn34-10", "wrn70-16")  # the official teachers
    assert (c10.teacher["dtype"], c100.teacher["dtype"]) == ("fp32", "fp16")
    assert (c10.lr, c10.weight_decay) == (c100.lr, c100.weight_decay) == (0.1, 2e-4)  # the schedule is shared

    # resnet18_rslad_cifar100.py: kl_loss(a, b) = -a*b + log(b + 1e-5)*b with a = log(softmax(S)), b =
    # softmax(T); loss = 5/6 * 10*mean(kl(S(x'))) + 1/6 * 10*mean(kl(S(x))). Ours leaves out the 1e-5,
    # a constant shift: the gradients agree.
    torch.manual_seed(0)
    student = torch.nn.Linear(12, 100)
    x, x_adv, t = torch.randn(6, 12), torch.randn(6, 12), torch.randn(6, 100) * 3

    def official():
        b = F.softmax(t, dim=1)
        kl = [-torch.log(F.softmax(student(v), dim=1)) * b + torch.log(b + 1e-5) * b for v in (x_adv, x)]
        return 5 / 6 * 10 * torch.mean(kl[0]) + 1 / 6 * 10 * torch.mean(kl[1])

    rslad = methods.get("rslad")(**c100.hparams)
    ctx = methods.Context(student=student, x=x, y=torch.zeros(6, dtype=torch.long), teacher_logits=t)
    ours = rslad.loss_at(ctx, x_adv)
    g_ours = torch.autograd.grad(ours, student.weight)[0]
    g_official = torch.autograd.grad(official(), student.weight)[0]
    torch.testing.assert_close(g_ours, g_official, rtol=1e-5, atol=1e-7)
    shift = (F.softmax(t, 1) * (torch.log(F.softmax(t, 1) + 1e-5) - torch.log(F.softmax(t, 1)))).mean() * 10
    torch.testing.assert_close(ours + shift, official(), rtol=1e-5, atol=1e-6)
    # log(softmax) and the fused log_softmax path: the same loss up to rounding
    fused = methods.get("rslad")(**{**c100.hparams, "log_of_softmax": False}).loss_at(ctx, x_adv)
    torch.testing.assert_close(fused, ours, rtol=1e-5, atol=1e-6)


def test_quick_presets_per_image_rule_follows_the_kl_scale():
    """lr x f, weight decay / f with f = C / kl_scale: the quick preset's RSLAD steps are the per-image KL's at
    the official lr 0.1 / weight decay 2e-4 on both data sets, and stay so for another kl_scale."""
    for dataset in ("cifar10", "cifar100"):
        cfg = _resolved("--preset", "quick", "--dataset", dataset)
        assert cfg.lr == pytest.approx(1.0) and cfg.weight_decay == pytest.approx(2e-5)
    cfg = _resolved("--preset", "quick", "--dataset", "cifar100", "--kl-scale", "1")
    assert cfg.lr == pytest.approx(10.0) and cfg.weight_decay == pytest.approx(2e-6)
    cfg = _resolved("--preset", "quick", "--dataset", "cifar100", "--kl-scale", "100")
    assert cfg.lr == pytest.approx(0.1) and cfg.weight_decay == pytest.approx(2e-4)
    trades = _resolved("--preset", "quick", "--dataset", "cifar100", "--method", "trades")
    assert (trades.lr, trades.weight_decay) == (0.1, 2e-4)  # a per-image loss already
    # the factor is exact: SGD at lr x f on RSLAD's loss steps as SGD at lr on its per-image form
    rslad = methods.get("rslad")(kl_scale=10.0, log_of_softmax=True)
    f = rslad.per_image_factor(100)
    s, t = torch.randn(4, 100, requires_grad=True), torch.randn(4, 100)
    g = torch.autograd.grad(10.0 * methods.rslad.mean_kl_log_of_softmax(s, t), s)[0]
    per_image = torch.autograd.grad(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean"), s)[0]
    torch.testing.assert_close(g * f, per_image, rtol=1e-5, atol=1e-7)


def test_teacher_dtype_flag_and_cast():
    assert _resolved("--teacher", "t.pt", "--dataset", "cifar100", "--teacher-dtype", "bf16").teacher["dtype"] == "bf16"
    assert _resolved("--teacher", "t.pt", "--teacher-dtype", "fp16").teacher["dtype"] == "fp16"
    assert _resolved("--dataset", "cifar100").teacher_run["teacher"] is None  # its TRADES run has no teacher
    with pytest.raises(UserError, match="trains without a teacher.*--teacher-dtype"):
        _resolved("--method", "trades", "--teacher-dtype", "fp16")
    torch.manual_seed(0)
    model = build("tiny", 100).eval()
    x = torch.rand(3, 3, 32, 32)
    half = cast_teacher(model, "fp16")
    assert isinstance(half, CastTeacher) and not half.training
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in half.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not override fp16
        out = half(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out, model.half()(x.half()).float())
    assert cast_teacher(model, "fp32") is model


def test_a_teacher_with_the_wrong_class_count_is_one_error(tmp_path, capsys, fake_cifar10, natural_teacher):
    c10 = fake_cifar10(n_train=64, n_test=16, seed=0)
    teacher10 = natural_teacher(
        c10, "--student", "tiny", "--epochs", "1", "--batch-size", "32", "--no-progress", "--threads", "1"
    )
    data = tmp_path / "c100"
    write_fake_cifar100(data, n_train=64, n_test=16)
    out = tmp_path / "run"
    err = _error(capsys, _args("rslad", data, out, teacher10))
    assert "teacher: checkpoint" in err and "has 10 output classes, the model here 100" in err and "--dataset" in err
    assert not out.exists()


# ---------------------------------------------------------------- resume


def test_resume_on_cifar100_is_bitwise_the_uninterrupted_run(data, teacher_ckpt, tmp_path):
    args = lambda out: _args("rslad", data, out, teacher_ckpt, "--epochs", "2", "--milestones", "1")  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(args(straight)) == 0
    cfg = train.resolve_config(train.build_parser().parse_args(args(resumed)))
    prep = prepare(cfg)
    create_run_dir(resumed, cfg)
    run(prep, resumed, progress=False, stop_after=1)
    assert train.main(["--resume", str(resumed), "--no-progress"]) == 0
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_config_written_before_the_dataset_field_reads_as_cifar10(data, teacher_ckpt, tmp_path):
    cfg = _resolved("--teacher", "t.pt").to_dict()
    for key in ("dataset", "wrn70_16_norm"):
        cfg.pop(key)
    cfg["teacher"].pop("dtype")
    old = Config.from_dict(cfg)
    assert (old.dataset, old.num_classes, old.teacher_dtype, old.wrn70_16_norm) == ("cifar10", 10, "fp32", "cifar10")


# ---------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def rslad_run(data, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("rslad100") / "run"
    assert train.main(_args("rslad", data, out, teacher_ckpt)) == 0
    return out


def test_evaluate_runs_every_attack_on_a_cifar100_run(rslad_run, data, capsys):
    pytest.importorskip("pyautoattack")
    out = rslad_run / "eval"
    argv = ["--run", str(rslad_run), "--data", str(data), "--n", "8", "--no-progress", "--no-download"]
    # eps 0.5 keeps AutoAttack fast: APGD-CE breaks every image (test_autoattack_... runs all four in full)
    assert evaluate.main([*argv, "--out", str(out), "--eps", "0.5"]) == 0, capsys.readouterr().err
    report = json.loads((out / "eval.json").read_text())
    assert report["dataset"] == "cifar100" and report["data"]["split"] == "CIFAR-100 test"
    assert report["config"]["dataset"] == "cifar100"  # from config.json: no --dataset given
    assert report["columns"] == ["clean", "fgsm", "pgd20-sat", "pgd20-trades", "cw", "aa"]
    assert report["config"]["autoattack"]["apgd-t"]["n_target_classes"] == 9
    assert report["config"]["autoattack"]["fab-t"]["n_target_classes"] == 9
    assert "CIFAR-100 test" in (out / "eval.md").read_text()
    err = _error(capsys, [*argv, "--dataset", "cifar10"], evaluate)
    assert "--dataset cifar10 disagrees" in err and "'cifar100'" in err
    # --ckpt: the data set from --dataset; a 100-class checkpoint evaluated as CIFAR-10 is refused
    ckpt = str(rslad_run / "last.pt")
    argv = ["--ckpt", ckpt, "--arch", "tiny", "--data", str(data), "--n", "8", "--no-progress", "--no-download"]
    assert evaluate.main([*argv, "--dataset", "cifar100", "--attacks", "clean,cw", "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["dataset"] == "cifar100"
    err = _error(capsys, [*argv, "--attacks", "clean"], evaluate)
    assert "has 100 output classes, the model here 10" in err


def test_autoattack_runs_its_targeted_attacks_with_9_of_100_classes(data):
    """A linear model fitted exactly to 6 images stays robust at eps 1/255, so every one of the four attacks
    runs in full on a 100-class model; the targeted ones take 9 target classes, as on CIFAR-10."""
    pytest.importorskip("pyautoattack")
    from rslad_fast.attacks.autoattack import AutoAttack

    x, y = load_cifar100(data, train=False, download=False)
    x, y = x[:6].float() / 255, y[:6]
    flat = x.reshape(6, -1)
    w = 20 * F.one_hot(y, 100).float().T @ torch.linalg.pinv(flat).T
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 100, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(w)
    lines = []
    aa = AutoAttack(eps=1 / 255, seed=0, batch_size=6, log=lines.append, verbose=True)
    _, y_adv = aa.run(model, x, y)
    assert torch.equal(y_adv, y)  # robust under all four
    assert aa.last_config["apgd-t"]["n_target_classes"] == 9 and aa.last_config["fab-t"]["n_target_classes"] == 9
    ran = " ".join(lines).lower()
    assert all(f"after {a}" in ran for a in ("apgd-ce", "apgd-t", "fab-t", "square")), ran


def test_cw_margin_is_over_all_100_classes():
    from rslad_fast.attacks.eval_attacks import cw_loss

    logits = torch.zeros(2, 100)
    logits[0, 3], logits[0, 57] = 5.0, 9.0  # true class 3, the strongest other class 57 (beyond 10)
    logits[1, 99], logits[1, 20] = 1.0, 4.0
    y = torch.tensor([3, 99])
    # -relu(real - max_other + 50): (5 - 9 + 50) + (1 - 4 + 50)
    assert cw_loss(y)(logits).item() == pytest.approx(-(46.0 + 47.0))


# ---------------------------------------------------------------- the official CIFAR-100 architectures
# Key names and forwards written from zibojia/RSLAD cifar100_models/{resnet,mobilenet_v2,wideresnet}.py
# (the kuangliu CIFAR ResNet-18 and MobileNetV2 with num_classes=100, DeepMind's WideResNet_70_16 with
# num_classes=100 and the CIFAR-10 mean/std): the state dict of each, filled with random values, loads
# strictly into ours and gives the logits of the definition.

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn_keys(prefix):
    return [f"{prefix}.{k}" for k in _BN]


def _resnet18_keys():
    keys = ["conv1.weight", *_bn_keys("bn1")]
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}"
            keys += [f"{p}.conv1.weight", *_bn_keys(f"{p}.bn1"), f"{p}.conv2.weight", *_bn_keys(f"{p}.bn2")]
            if layer > 1 and b == 0:  # stride 2 or 64 -> 128 ...: a 1x1 conv + BN shortcut
                keys += [f"{p}.shortcut.0.weight", *_bn_keys(f"{p}.shortcut.1")]
    return keys + ["linear.weight", "linear.bias"]


MNV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _mnv2_blocks():
    """(index, in, out, expansion, stride) per block of the cfg (expansion, out_planes, num_blocks, stride)."""
    blocks, inp = [], 32
    for e, c, n, s in MNV2_CFG:
        for j in range(n):
            blocks.append((len(blocks), inp, c, e, s if j == 0 else 1))
            inp = c
    return blocks


def _mnv2_keys():
    keys = ["conv1.weight", *_bn_keys("bn1")]
    for i, inp, out, _, stride in _mnv2_blocks():
        p = f"layers.{i}"
        for k in (1, 2, 3):
            keys += [f"{p}.conv{k}.weight", *_bn_keys(f"{p}.bn{k}")]
        if stride == 1 and inp != out:
            keys += [f"{p}.shortcut.0.weight", *_bn_keys(f"{p}.shortcut.1")]
    return keys + ["conv2.weight", *_bn_keys("bn2"), "linear.weight", "linear.bias"]


def _wrn_keys(depth):
    keys = ["init_conv.weight"]
    for g in range(3):
        for k in range((depth - 4) // 6):
            p = f"layer.{g}.block.{k}"
            keys += [*_bn_keys(f"{p}.batchnorm_0"), f"{p}.conv_0.weight", *_bn_keys(f"{p}.batchnorm_1")]
            keys += [f"{p}.conv_1.weight"] + ([f"{p}.shortcut.weight"] if k == 0 else [])  # channels change
    return keys + [*_bn_keys("batchnorm"), "logits.weight", "logits.bias"]


def _bn(sd, p, t):
    return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])


def _resnet18_forward(sd, x):
    out = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    for layer, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for b in range(2):
            p, s = f"layer{layer}.{b}", stride if b == 0 else 1
            o = F.relu(_bn(sd, p + ".bn1", F.conv2d(out, sd[p + ".conv1.weight"], stride=s, padding=1)))
            o = _bn(sd, p + ".bn2", F.conv2d(o, sd[p + ".conv2.weight"], padding=1))
            short = out
            if p + ".shortcut.0.weight" in sd:
                short = _bn(sd, p + ".shortcut.1", F.conv2d(out, sd[p + ".shortcut.0.weight"], stride=s))
            out = F.relu(o + short)
    return F.linear(F.avg_pool2d(out, 4).flatten(1), sd["linear.weight"], sd["linear.bias"])


def _mnv2_forward(sd, x):
    out = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    for i, inp, _, e, stride in _mnv2_blocks():
        p = f"layers.{i}"
        o = F.relu(_bn(sd, p + ".bn1", F.conv2d(out, sd[p + ".conv1.weight"])))
        o = F.relu(_bn(sd, p + ".bn2", F.conv2d(o, sd[p + ".conv2.weight"], stride=stride, padding=1, groups=e * inp)))
        o = _bn(sd, p + ".bn3", F.conv2d(o, sd[p + ".conv3.weight"]))
        if stride == 1:  # the residual only at stride 1: identity, or the 1x1 conv + BN where channels change
            short = out
            if p + ".shortcut.0.weight" in sd:
                short = _bn(sd, p + ".shortcut.1", F.conv2d(out, sd[p + ".shortcut.0.weight"]))
            o = o + short
        out = o
    out = F.relu(_bn(sd, "bn2", F.conv2d(out, sd["conv2.weight"])))
    return F.linear(F.avg_pool2d(out, 4).flatten(1), sd["linear.weight"], sd["linear.bias"])


def _wrn_forward(sd, x, depth, mean, std):
    swish = lambda t: t * torch.sigmoid(t)  # noqa: E731
    out = F.conv2d(
        (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1), sd["init_conv.weight"], padding=1
    )
    for g, stride in enumerate((1, 2, 2)):
        for k in range((depth - 4) // 6):
            p, s = f"layer.{g}.block.{k}", stride if k == 0 else 1
            act = swish(_bn(sd, p + ".batchnorm_0", out))
            o = F.conv2d(F.pad(act, (1, 1, 1, 1) if s == 1 else (0, 1, 0, 1)), sd[p + ".conv_0.weight"], stride=s)
            o = F.conv2d(swish(_bn(sd, p + ".batchnorm_1", o)), sd[p + ".conv_1.weight"], padding=1)
            short = F.conv2d(act, sd[p + ".shortcut.weight"], stride=s) if p + ".shortcut.weight" in sd else out
            out = short + o
    out = swish(_bn(sd, "batchnorm", out))
    return F.linear(F.avg_pool2d(out, 8).flatten(1), sd["logits.weight"], sd["logits.bias"])


def _random_state(model, keys, path):
    """The official layout's state dict (``keys``, shapes from ``model``), random values, saved as RSLAD saves
    its students (DataParallel's ``module.`` prefix)."""
    torch.manual_seed(0)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sd = {}
    for k in keys:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shapes[k]) + 0.5
        elif k.endswith(("running_mean", ".bias")) or ("bn" in k or "batchnorm" in k):
            sd[k] = torch.randn(shapes[k]) * 0.1 + (1.0 if k.endswith("weight") else 0.0)
        else:  # conv and linear weights, He-scaled so that the logits stay finite through the depth
            fan_in = int(np.prod(shapes[k][1:]))
            sd[k] = torch.randn(shapes[k]) * (1.0 / fan_in) ** 0.5
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    return sd


@pytest.mark.parametrize("arch", ["resnet18", "mnv2", "wrn70-16"])
def test_official_cifar100_architectures_load_with_their_logits(arch, tmp_path):
    full = {"resnet18": _resnet18_keys, "mnv2": _mnv2_keys, "wrn70-16": lambda: _wrn_keys(70)}[arch]()
    with torch.device("meta"):
        big = build(arch, 100)
    assert sorted(big.state_dict()) == sorted(full)  # the published layout, key for key, at full size
    assert big.state_dict()[full[-2]].shape[0] == 100
    x = torch.rand(2, 3, 32, 32)
    if arch == "wrn70-16":  # the logits on a small member of the same family (WRN-16-2: 2 blocks per group)
        for norm, mean, std in (("cifar10", CIFAR10_MEAN, CIFAR10_STD), ("cifar100", CIFAR100_MEAN, CIFAR100_STD)):
            model = DMWideResNet(num_classes=100, depth=16, width=2, mean=mean, std=std).eval()
            sd = _random_state(model, _wrn_keys(16), tmp_path / "wrn.pt")
            load_checkpoint_into(model, tmp_path / "wrn.pt", arch)
            with torch.no_grad():
                torch.testing.assert_close(model(x), _wrn_forward(sd, x, 16, mean, std), rtol=1e-5, atol=1e-5)
            assert torch.equal(build(arch, 100, normalization=norm).mean.flatten(), torch.tensor(mean))
        # the official WideResNet_70_16() normalizes with the CIFAR-10 constants: our default
        assert torch.equal(build(arch, 100).std.flatten(), torch.tensor(CIFAR10_STD))
        return
    model = build(arch, 100).eval()
    sd = _random_state(model, full, tmp_path / "official.pt")
    load_checkpoint_into(model, tmp_path / "official.pt", arch)
    forward = {"resnet18": _resnet18_forward, "mnv2": _mnv2_forward}[arch]
    with torch.no_grad():
        torch.testing.assert_close(model(x), forward(sd, x), rtol=1e-6, atol=1e-6)


def test_wrn70_16_norm_is_recorded_and_a_file_of_the_other_normalization_says_so(tmp_path):
    assert _resolved("--teacher", "t.pt", "--dataset", "cifar100").wrn70_16_norm == "cifar10"
    cfg = _resolved("--teacher", "t.pt", "--dataset", "cifar100", "--wrn70-16-norm", "cifar100")
    assert cfg.wrn70_16_norm == "cifar100" and cfg.teacher["arch"] == "wrn70-16"
    assert _resolved("--dataset", "cifar100", "--wrn70-16-norm", "cifar100").teacher_run["wrn70_16_norm"] == "cifar100"
    # a RobustBench-style file that stores DeepMind's CIFAR-100 mean/std, loaded with the default constants
    model = DMWideResNet(num_classes=100, depth=10, width=1)
    sd = dict(model.state_dict(), mean=torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    torch.save(sd, tmp_path / "dm.pt")
    with pytest.raises(UserError, match="'mean'.*differs.*the cifar100 mean.*--wrn70-16-norm cifar100"):
        load_checkpoint_into(model, tmp_path / "dm.pt", "wrn70-16")


def test_the_issue_commands_mnv2_quick_preset_then_evaluate(data, tmp_path, capsys):
    """`train --dataset cifar100 --student mnv2` (quick preset, its self-trained teacher in fp16) and
    `evaluate --dataset cifar100` on its checkpoint, at test sizes."""
    run_dir = tmp_path / "mnv2"
    argv = ["--dataset", "cifar100", "--preset", "quick", "--student", "mnv2", "--teacher-arch", "tiny"]
    argv += ["--train-n", "64", "--epochs", "1", "--eval-n", "16", "--threads", "1", "--no-progress"]
    assert train.main([*argv, "--no-download", "--data", str(data), "--out", str(run_dir)]) == 0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert (cfg["dataset"], cfg["student"], cfg["teacher"]["dtype"]) == ("cifar100", "mnv2", "fp16")
    assert cfg["hparams"]["kl_scale"] == 10.0 and cfg["lr"] == pytest.approx(1.0)
    ev = ["--ckpt", str(run_dir / "last.pt"), "--arch", "mnv2", "--dataset", "cifar100", "--data", str(data)]
    capsys.readouterr()
    assert evaluate.main([*ev, "--attacks", "clean,fgsm,cw", "--n", "8", "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["data"]["split"] == "CIFAR-100 test" and report["n"] == 8
    assert set(report["rows"][0]["accuracy"]) >= {"clean", "fgsm", "cw"}
    # the same checkpoint without --dataset is a 10-class model: one error naming the class counts
    assert evaluate.main([*ev[:4], "--data", str(data), "--n", "8", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "100 output classes" in capsys.readouterr().err
