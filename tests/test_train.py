"""python -m rslad_fast.train end to end on the learnable fake CIFAR-10, with the 5k-parameter `tiny` model.

Tiny and CPU-only: 256 training images, 64 held-out images, one thread, a few epochs. In-process calls of
`train.main` for the training runs (no interpreter start-up per run); subprocesses, launched in parallel,
for the bad-input checks, which are about what a user sees on the terminal (exit code, stderr).
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from rslad_fast import methods, train
from rslad_fast.engine.config import Config
from rslad_fast.models import build

COMMON = ["--student", "tiny", "--threads", "1", "--eval-n", "32", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=64, seed=0)


@pytest.fixture(scope="module")
def teacher_ckpt(data, natural_teacher):
    """A naturally trained tiny model: the teacher of the distillation runs (our own last.pt format)."""
    return natural_teacher(data, "--epochs", "3", *COMMON)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- every method trains ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["natural", "sat", "trades", "mart", "ard", "iad", "rslad", "adaad", "dgad", "peeraid", "mtard"]
)
def test_every_method_trains_and_the_loss_decreases(method, data, teacher_ckpt, tmp_path):
    cls = methods.get(method)
    args = ["--method", method, "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "3", *COMMON]
    if cls.needs_teacher:
        args += ["--teacher", str(teacher_ckpt), "--teacher-arch", "tiny"]
    if getattr(cls, "needs_nat_teacher", False):  # MTARD: the same file serves as its natural teacher
        args += ["--nat-teacher", str(teacher_ckpt), "--nat-teacher-arch", "tiny"]
    if "steps" in cls.HPARAMS:
        args += ["--steps", "3"]  # the engine is under test here, not the attacks: keep it cheap
    if method == "iad":
        args += ["--begin", "0"]  # IAD's own loss from the start (one loss form: comparable epochs)
    assert train.main(args) == 0
    recs = _records(tmp_path / "run")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    losses = [r["train_loss"] for r in recs]
    assert losses[-1] < losses[0], losses
    if method == "iad":
        assert all("train_loss_self" in r for r in recs)
    assert all(0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["pgd20_acc"] <= 1.0 for r in recs)
    assert recs[-1]["clean_acc"] > 0.2  # the fake classes are easy: well above the 10% of chance


# ---- what a run writes -----------------------------------------------------------------------------------


def test_run_directory_is_well_formed(data, teacher_ckpt, tmp_path):
    run = tmp_path / "run"
    assert (
        train.main(
            [
                "--method",
                "rslad",
                "--student",
                "TinyCNN",
                "--data",
                str(data),
                "--out",
                str(run),
                "--epochs",
                "2",
                "--teacher",
                str(teacher_ckpt),
                "--teacher-arch",
                "tiny",
                "--milestones",
                "1",
                "--seed",
                "7",
                *COMMON[2:],
            ]
        )
        == 0
    )
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.jsonl"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["student"] == "tiny" and cfg["method"] == "rslad" and cfg["preset"] == "paper"
    assert cfg["seed"] == 7 and cfg["epochs"] == 2 and cfg["milestones"] == [1]
    assert cfg["hparams"] == methods.get("rslad")().hparams()  # every hparam, official values
    assert cfg["teacher"] == {
        "source": "file",
        "path": str(teacher_ckpt.resolve()),
        "arch": "tiny",
        "dtype": "fp32",  # CIFAR-10's default (cifar100: fp16, tests/test_cifar100.py)
        "sha256": hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest(),
    }
    assert cfg["eval_attack"] == dict(eps=8 / 255, alpha=0.003, steps=20, start="uniform")
    assert cfg["versions"]["torch"] == torch.__version__ and cfg["versions"]["rslad_fast"]
    Config.from_dict(cfg)  # round-trips

    recs = _records(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert [r["lr"] for r in recs] == pytest.approx([0.1, 0.01])  # MultiStepLR, milestone 1, gamma 0.1
    for r in recs:
        for key in (
            "train_loss",
            "train_loss_adv",
            "train_loss_nat",
            "train_acc_nat",
            "clean_acc",
            "pgd20_acc",
            "epoch_time_s",
            "eval_time_s",
            "images_per_s",
        ):
            assert isinstance(r[key], float), key
        assert r["eval_n"] == 32 and isinstance(r["best"], bool)

    last = torch.load(run / "last.pt", weights_only=True)  # everything weights_only-loadable
    best = torch.load(run / "best.pt", weights_only=True)
    for ck in (last, best):
        assert {"model", "optimizer", "scheduler", "epoch", "rng", "best_acc", "config"} <= set(ck)
        assert set(ck["rng"]) >= {"torch", "cuda", "numpy", "python", "train_generator", "loader"}
        assert ck["config"] == cfg
        build("tiny").load_state_dict(ck["model"])
    assert last["epoch"] == 2 and last["best_acc"] == pytest.approx(max(r["pgd20_acc"] for r in recs))
    best_epoch = max(recs, key=lambda r: (r["pgd20_acc"], -r["epoch"]))["epoch"]
    assert best["epoch"] == best_epoch
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_self_trained_teacher_then_distillation_and_reuse(data, tmp_path):
    """No --teacher: TRADES trains the teacher in RUN_DIR/teacher/ first; a resume reuses it."""
    run = tmp_path / "run"
    args = [
        "--preset",
        "quick",
        "--method",
        "rslad",
        "--teacher-arch",
        "tiny",
        "--train-n",
        "256",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "2",
        *COMMON,
    ]
    assert train.main(args) == 0
    tdir = run / "teacher"
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"} <= {p.name for p in tdir.iterdir()}
    tcfg = json.loads((tdir / "config.json").read_text())
    assert tcfg["method"] == "trades" and tcfg["student"] == "tiny" and tcfg["preset"] == "quick"
    quick = train.PRESETS["quick"]
    assert tcfg["epochs"] == quick.teacher_epochs and len(_records(tdir)) == quick.teacher_epochs
    assert tcfg["train_n"] == 256  # an explicit --train-n sizes the teacher's run too
    # RSLAD's loss is a mean over B*C logits: the quick preset's lr x C, weight decay / C (see the next
    # test); the teacher's TRADES keeps the official 0.1 and 2e-4.
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["lr"], cfg["weight_decay"]) == (pytest.approx(1.0), pytest.approx(2e-5))
    assert (tcfg["lr"], tcfg["weight_decay"]) == (pytest.approx(0.1), pytest.approx(2e-4))
    assert tcfg["hparams"]["steps"] == quick.attack_steps
    assert tcfg["hparams"]["step_size"] == pytest.approx(0.007 * 10 / quick.attack_steps)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["teacher"] == {"source": "trained", "arch": "tiny", "dir": "teacher", "dtype": "fp32"}
    assert cfg["teacher_run"] == tcfg and len(_records(run)) == 2
    assert cfg["milestones"] == [1] and tcfg["milestones"] == [quick.teacher_epochs - 1]  # last epoch x0.1

    stamp = (tdir / "last.pt").stat().st_mtime_ns, (run / "last.pt").stat().st_mtime_ns
    assert train.main(["--resume", str(run), "--no-progress"]) == 0  # finished: nothing retrained
    assert ((tdir / "last.pt").stat().st_mtime_ns, (run / "last.pt").stat().st_mtime_ns) == stamp


def test_per_element_loss_at_lr_times_c_is_sgd_on_the_per_image_loss():
    """The quick preset's RSLAD schedule (lr x C, weight decay / C on the official mean over B*C) takes the
    very SGD steps (momentum included) of the per-image KL at the official lr 0.1 and weight decay 2e-4."""
    from rslad_fast import ops

    torch.manual_seed(0)
    x, teacher = torch.rand(8, 3, 32, 32), torch.randn(8, 10)
    models = [build("tiny"), build("tiny")]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    opts = [
        torch.optim.SGD(models[0].parameters(), lr=0.1 * 10, momentum=0.9, weight_decay=2e-4 / 10),
        torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4),
    ]
    for _ in range(4):
        for model, opt, reduction in zip(models, opts, ("mean", "batchmean")):
            opt.zero_grad()
            ops.softmax_kl(model(x), teacher, reduction=reduction).backward()
            opt.step()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [(p - q).abs().max() for p, q in zip(models[0].parameters(), start)]
    assert max(moved) > 1e-3  # the steps did move the weights


def test_teacher_is_frozen_and_sees_eval_mode(data, teacher_ckpt, tmp_path, monkeypatch):
    from rslad_fast.engine import step

    seen = []
    original = step.Context

    def spy(**kw):
        t = kw["teacher"]
        seen.append((t.training, any(p.requires_grad for p in t.parameters()), kw["teacher_logits"].requires_grad))
        return original(**kw)

    monkeypatch.setattr(step, "Context", spy)
    assert (
        train.main(
            [
                "--method",
                "ard",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "r"),
                "--epochs",
                "1",
                "--teacher",
                str(teacher_ckpt),
                "--teacher-arch",
                "tiny",
                *COMMON,
            ]
        )
        == 0
    )
    assert seen and all(s == (False, False, False) for s in seen)


# ---- bad input: one line on stderr, exit 2, nothing written ----------------------------------------------


def _check_error(name, rc, stdout, stderr, expected):
    lines = stderr.strip().splitlines()
    assert rc == 2, (name, rc, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
    assert expected in lines[0], (name, lines[0])
    assert "Traceback" not in stderr + stdout, name


def test_bad_inputs_fail_cleanly_from_the_command_line(data, teacher_ckpt, tmp_path):
    """The issue's list, each through a real `python -m rslad_fast.train` (launched in parallel)."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    cases = {
        "unknown student": (["--student", "resnet1000"], "unknown architecture"),
        "unknown method": (["--method", "fgsm-free"], "unknown method"),
        "missing teacher": (["--method", "rslad", "--teacher", str(tmp_path / "nope.pt")], "no such file"),
        "corrupt teacher": (["--method", "rslad", "--teacher", str(corrupt)], "not a readable"),
        "teacher arch mismatch": (
            ["--method", "rslad", "--teacher", str(teacher_ckpt), "--teacher-arch", "mnv2"],
            "does not match architecture",
        ),
        "no CIFAR-10 at data": (["--data", str(tmp_path / "empty"), "--no-download"], "CIFAR-10 not found"),
        "zero epochs": (["--epochs", "0"], "--epochs"),
        "negative batch": (["--batch-size", "-4"], "--batch-size"),
        "eps above 1": (["--method", "sat", "--eps", "2"], "eps"),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for name, (extra, _) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        argv = ["--data", str(data), "--epochs", "1", *COMMON, *extra, "--out", str(out)]
        procs[name] = (
            out,
            subprocess.Popen(
                [sys.executable, "-m", "rslad_fast.train", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (out, p) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        _check_error(name, p.returncode, stdout, stderr, cases[name][1])
        assert not out.exists(), name


def test_more_bad_inputs_fail_cleanly(data, teacher_ckpt, tmp_path, capsys):
    """The same contract in-process (no interpreter start-up each)."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    tiny_teacher = ["--teacher", str(teacher_ckpt), "--teacher-arch", "tiny"]
    cases = {
        "eps below 0": (["--method", "rslad", "--eps=-0.1", *tiny_teacher], "eps"),
        "flag of another method": (["--method", "rslad", "--beta", "6", *tiny_teacher], "--beta"),
        "teacher for a method without": (["--method", "trades", *tiny_teacher], "without a teacher"),
        "not a number": (["--lr", "fast"], "--lr"),
        "eval subset too large": (["--eval-n", "100000"], "--eval-n"),
        "dali on the cpu": (["--loader", "dali", "--device", "cpu"], "dali"),
        "out exists": (["--out", str(existing)], "already exists"),
        "overwrite a non-run dir": (["--out", str(existing), "--overwrite"], "not a run directory"),
        "resume nothing": (["--resume", str(tmp_path / "absent-run")], "no such directory"),
    }
    for name, (extra, expected) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        if "--resume" in extra:
            argv = extra
        else:
            argv = ["--data", str(data), "--epochs", "1", *COMMON, *extra]
            argv += [] if "--out" in extra else ["--out", str(out)]
        capsys.readouterr()
        try:
            rc = train.main(argv)
        except SystemExit as e:  # argparse errors exit from inside parse_args
            rc = e.code
        captured = capsys.readouterr()
        _check_error(name, rc, captured.out, captured.err, expected)
        assert not out.exists(), name
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # untouched


def test_overwrite_replaces_a_run_directory(data, tmp_path):
    run = tmp_path / "run"
    args = ["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "1", *COMMON]
    assert train.main(args) == 0
    assert train.main(args) == 2  # exists
    assert train.main(args + ["--overwrite", "--epochs", "2"]) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]


def test_resume_refuses_other_settings(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "1", *COMMON]) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--epochs", "5"]) == 2
    assert "--epochs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, flag", [(["--seed", "0"], "--seed"), (["--no-lr-bug"], "--lr-bug"), (["--train-n", "0"], "--train-n")]
)
def test_resume_refuses_a_setting_given_as_zero_or_false(data, tmp_path, capsys, extra, flag):
    """A setting is refused with --resume whatever its value (before: 0 and False passed as not given, and
    were silently ignored)."""
    run = tmp_path / "run"
    assert train.main(["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "1", *COMMON]) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(run), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume") and f"drop {flag}" in err[0], err


def test_hyperparameter_flags_cover_every_method():
    parser = train.build_parser()
    flags = {a.dest for a in parser._actions}
    for name in methods.names():
        for key in methods.get(name).HPARAMS:
            assert f"hp_{key}" in flags, (name, key)
    args = parser.parse_args(["--eps", "8/255", "--lr-bug", "--steps", "3"])
    assert args.hp_eps == pytest.approx(8 / 255) and args.hp_lr_bug is True and args.hp_steps == 3
    cfg = train.resolve_config(parser.parse_args(["--method", "ard", "--lr-bug", "--student", "tiny"]))
    assert cfg.milestones == [100] and cfg.hparams["lr_bug"] is True  # ARD's bug: the 2nd decay never happens
    cfg = train.resolve_config(parser.parse_args(["--method", "ard", "--student", "tiny"]))
    assert cfg.milestones == [100, 150] and cfg.epochs == 200 and cfg.teacher["arch"] == "wrn34-10"
    cfg = train.resolve_config(
        parser.parse_args(["--method", "iad", "--student", "tiny", "--preset", "quick", "--epochs", "10"])
    )
    assert cfg.hparams["begin"] == 3 and cfg.milestones == [9]  # 60 of 200 epochs -> 3 of 10
    k = train.PRESETS["quick"].attack_steps  # IAD: 10 steps of 2/255, the travel kept: k steps of 20/k /255
    assert cfg.hparams["steps"] == k and cfg.hparams["step_size"] == pytest.approx(10 * 2 / 255 / k)
    quick_teacher = train.PRESETS["quick"].teacher_arch
    assert cfg.teacher == {"source": "trained", "arch": quick_teacher, "dir": "teacher", "dtype": "fp32"}


# ---- divergence: stop before any non-finite checkpoint is written -------------------------------------------


def test_divergence_names_the_epoch_and_batch_and_writes_nothing(data, tmp_path, capsys):
    """lr 1e30: the first step blows the weights up, a later batch's loss is NaN; the run stops after
    epoch 1 with no checkpoint (before: the message named only the epoch mean)."""
    run = tmp_path / "run"
    capsys.readouterr()
    rc = train.main(
        ["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "2", "--lr", "1e30", *COMMON]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert "epoch 1" in err[0] and "batch 2/4" in err[0] and "no checkpoint" in err[0], err[0]
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_non_finite_buffer_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    """A BatchNorm running_var turned inf in epoch 2 (the loss stays finite: train mode normalizes with the
    batch's statistics): nothing of epoch 2 is written, epoch 1's last.pt and best.pt stay (before: an
    epoch-2 last.pt with an inf running_var, exit 0)."""
    from rslad_fast.engine import runner

    original = runner.train_one_epoch

    def poisoned(state, epoch, **kw):
        out = original(state, epoch, **kw)
        if epoch == 1:
            with torch.no_grad():
                state.student.bn2.running_var[3] = float("inf")
        return out

    monkeypatch.setattr(runner, "train_one_epoch", poisoned)
    run = tmp_path / "run"
    capsys.readouterr()
    rc = train.main(["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "3", *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "epoch 2" in err[0] and "bn2.running_var" in err[0] and "epoch 1" in err[0], err[0]
    for name in ("last.pt", "best.pt"):
        ck = torch.load(run / name, weights_only=True)
        assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _records(run)] == [1]


# ---- the run directory's lock ----------------------------------------------------------------------------


def _try_lock(path):
    """Whether a second open of ``path`` gets the exclusive flock (flock locks belong to the open file, so
    a second open conflicts with the run's own lock even in this process)."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_the_run_directory_is_locked_for_the_life_of_the_run(data, tmp_path, monkeypatch):
    from rslad_fast.engine import runner

    run = tmp_path / "run"
    seen = []
    original = runner.train_one_epoch

    def spy(*a, **kw):
        seen.append(_try_lock(run / ".lock"))
        return original(*a, **kw)

    monkeypatch.setattr(runner, "train_one_epoch", spy)
    args = ["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "1", *COMMON]
    assert train.main(args) == 0
    assert train.main(["--resume", str(run), "--no-progress"]) == 0  # already complete: no epoch runs
    assert train.main(args + ["--overwrite"]) == 0
    assert seen == [False, False]  # held while training, for a new run and an overwrite
    assert not (run / ".lock").exists()  # and released at the end


def test_a_locked_run_directory_is_refused(data, tmp_path, capsys):
    """Another process's run: --resume, --overwrite and --out all refuse it with one line, and nothing of
    it is deleted (before: --overwrite removed its files, --resume trained it a second time)."""
    import fcntl

    run = tmp_path / "run"
    args = ["--method", "natural", "--data", str(data), "--out", str(run), "--epochs", "1", *COMMON]
    assert train.main(args) == 0
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        files = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        for argv in (["--resume", str(run), "--no-progress"], args + ["--overwrite"]):
            capsys.readouterr()
            rc = train.main(argv)
            err = capsys.readouterr().err
            _check_error(argv[0], rc, "", err, "in use by another process")
            assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == files
    assert train.main(args + ["--overwrite"]) == 0  # the lock released: allowed again


def test_stale_temporary_files_do_not_make_a_folder_unusable(data, tmp_path, capsys):
    """A kill during the config.json write leaves only `.config.json.tmp-PID` (and a kill at any moment, a
    stale `.lock`): --out takes the folder as empty, --overwrite accepts it, --resume points to --out
    (before: --out said resume, --resume said no config, --overwrite said not a run directory)."""
    args = ["--method", "natural", "--data", str(data), "--epochs", "1", *COMMON]
    for extra in ([], ["--overwrite"]):
        run = tmp_path / f"run{len(extra)}"
        run.mkdir()
        (run / ".config.json.tmp-4242").write_bytes(b'{"stud')
        (run / ".lock").write_text("4242\n")
        capsys.readouterr()
        rc = train.main(["--resume", str(run), "--no-progress"])
        _check_error("resume", rc, "", capsys.readouterr().err, "--out")
        assert train.main(args + ["--out", str(run), *extra]) == 0
        assert sorted(p.name for p in run.iterdir()) == [
            "best.pt",
            "config.json",
            "curves.png",
            "last.pt",
            "metrics.jsonl",
        ]


# ---- file-system failures: one line, non-zero exit, nothing half-written ---------------------------------


def _enospc(*a, **k):
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(data, tmp_path, capsys, monkeypatch):
    """The checkpoints of epoch 2 go to /dev/full (the kernel's ENOSPC, which torch.save reports as a
    RuntimeError): one line, epoch 1's last.pt and metrics kept, no temporary or half epoch left (before: a
    chained traceback and epoch 2's metrics line without its checkpoint); at the config.json write of a
    new run: no run directory at all."""
    import builtins

    from rslad_fast import atomic

    saves = []

    def open_(path, mode="r", *a, **k):
        if ".pt.tmp-" in str(path):
            saves.append(path)
            if len(saves) > 2:  # epoch 1 wrote best.pt and last.pt
                return builtins.open("/dev/full", mode, *a, **k)
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(atomic, "open", open_, raising=False)
    run = tmp_path / "run"
    args = ["--method", "natural", "--data", str(data), "--epochs", "3", *COMMON]
    capsys.readouterr()
    rc = train.main(args + ["--out", str(run)])
    err = capsys.readouterr().err
    _check_error("ENOSPC", rc, "", err, "No space left on device")
    assert "--resume" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in _records(run)] == [1]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.jsonl"]

    monkeypatch.setattr(os, "fsync", _enospc)  # the first write of a new run: config.json
    fresh = tmp_path / "new" / "run"
    rc = train.main(args + ["--out", str(fresh)])
    _check_error("ENOSPC config", rc, "", capsys.readouterr().err, "No space left on device")
    assert not (tmp_path / "new").exists()


def test_out_paths_that_cannot_be_written_fail_with_one_line(data, tmp_path, capsys, monkeypatch):
    """A file where a folder is expected, a name over 255 bytes, a read-only file system (before: a
    traceback each; an unwritable folder is refused the same way, see the next test)."""
    (tmp_path / "a_file").write_text("x")
    args = ["--method", "natural", "--data", str(data), "--epochs", "1", *COMMON]
    cases = {
        "file in the way": (tmp_path / "a_file" / "run", "a_file is a file"),
        "long name": (tmp_path / ("r" * 300), "over"),
    }
    for name, (out, expected) in cases.items():
        capsys.readouterr()
        rc = train.main(args + ["--out", str(out)])
        _check_error(name, rc, "", capsys.readouterr().err, expected)
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "mkdir", read_only)  # a file system that turned read-only after the checks
    rc = train.main(args + ["--out", str(tmp_path / "ro" / "run")])
    _check_error("read-only", rc, "", capsys.readouterr().err, "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_out_folder_fails_with_one_line(data, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        rc = train.main(
            ["--method", "natural", "--data", str(data), "--epochs", "1", *COMMON, "--out", str(parent / "run")]
        )
        _check_error("unwritable", rc, "", capsys.readouterr().err, "not writable")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


def test_eval_n_default_larger_than_the_test_set_uses_all_of_it(data, tmp_path, capsys):
    """The paper preset's 1000 held-out images on a 64-image test set: all 64, said on stdout and recorded;
    the self-trained teacher's run (which takes the student's eval_n) the same, and a resume agrees with it
    (before: '--eval-n 1000 exceeds the 64 test images', an option the user never gave). An explicit --eval-n
    too large stays an error (test_more_bad_inputs_fail_cleanly)."""
    run = tmp_path / "run"
    args = [
        "--method",
        "natural",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "1",
        *[a for a in COMMON if a not in ("--eval-n", "32")],
    ]
    capsys.readouterr()
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "whole test set" in out and "64" in out
    assert json.loads((run / "config.json").read_text())["eval_n"] == 64 and _records(run)[0]["eval_n"] == 64

    run = tmp_path / "distilled"
    args = [
        "--preset",
        "quick",
        "--method",
        "rslad",
        "--teacher-arch",
        "tiny",
        "--train-n",
        "128",
        "--data",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--steps",
        "1",
        *[a for a in COMMON if a not in ("--eval-n", "32")],
    ]
    assert train.main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["eval_n"] == cfg["teacher_run"]["eval_n"] == 64
    assert json.loads((run / "teacher" / "config.json").read_text())["eval_n"] == 64
    assert train.main(["--resume", str(run), "--no-progress"]) == 0  # complete: nothing retrained
