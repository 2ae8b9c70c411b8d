"""Resume: a run interrupted at any moment and continued with --resume ends with bitwise the same weights.

Tiny model, fake data, one thread (the thread count is part of the run's config and reused on resume, since
CPU kernels may split reductions by thread). The lr milestone at epoch 1 and 2 makes the scheduler state
matter; augmentation, PGD random starts and the loader shuffle make every RNG stream matter.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rslad_fast import train
from rslad_fast.engine import create_run_dir, prepare, run
from rslad_fast.engine.checkpoint import atomic_save, atomic_write_bytes, load_checkpoint

COMMON = [
    "--student",
    "tiny",
    "--threads",
    "1",
    "--eval-n",
    "16",
    "--batch-size",
    "64",
    "--epochs",
    "3",
    "--milestones",
    "1,2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=192, n_test=16, seed=1)


@pytest.fixture(scope="module")
def teacher_ckpt(data, natural_teacher):
    return natural_teacher(data, *COMMON)


def _args(method, data, out, teacher_ckpt):
    args = ["--method", method, "--data", str(data), "--out", str(out), *COMMON, "--steps", "3"]
    if method in ("rslad", "ard", "iad"):
        args += ["--teacher", str(teacher_ckpt), "--teacher-arch", "tiny"]
    return args


def _assert_same_state(dir_a, dir_b):
    a, b = torch.load(dir_a / "last.pt", weights_only=True), torch.load(dir_b / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # every parameter and buffer (BatchNorm running stats, num_batches_tracked)
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["best_acc"] == b["best_acc"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    ra = [json.loads(line) for line in (dir_a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (dir_b / "metrics.jsonl").read_text().splitlines()]
    # timings, and the teacher cache's counters: the cache is not checkpointed, so a resumed process redoes
    # the teacher forwards an uninterrupted one had cached (the weights above stay bitwise the same)
    timing = ("epoch_time_s", "eval_time_s", "images_per_s", "teacher_cache_hit_rate", "teacher_forwards_saved")
    assert [{k: v for k, v in r.items() if k not in timing} for r in ra] == [
        {k: v for k, v in r.items() if k not in timing} for r in rb
    ]


def _start(args):
    """Resolve, check and create the run directory as the CLI does, without training."""
    cfg = train.resolve_config(train.build_parser().parse_args(args))
    out = args[args.index("--out") + 1]
    prep = prepare(cfg)
    create_run_dir(out, cfg)
    return prep


@pytest.fixture(scope="module")
def straight(data, teacher_ckpt, tmp_path_factory):
    """The uninterrupted reference run (RSLAD: teacher, KL attack with its random start, augmentation)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train.main(_args("rslad", data, out, teacher_ckpt)) == 0
    return out


def test_resume_after_epoch_two_is_bitwise_identical(straight, data, teacher_ckpt, tmp_path):
    resumed = tmp_path / "resumed"
    prep = _start(_args("rslad", data, resumed, teacher_ckpt))
    run(prep, resumed, progress=False, stop_after=2)  # as if killed right after epoch 2's checkpoint
    assert load_checkpoint(resumed / "last.pt")["epoch"] == 2
    # a kill between the metrics line and last.pt, and a torn line: both must disappear on resume
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "train_loss": -1.0}) + "\n" + '{"epoch": 4, "train_lo')
    assert train.main(["--resume", str(resumed), "--no-progress"]) == 0
    _assert_same_state(straight, resumed)


def test_resume_before_the_first_checkpoint_starts_over(straight, data, teacher_ckpt, tmp_path):
    resumed = tmp_path / "resumed"
    _start(_args("rslad", data, resumed, teacher_ckpt))  # config.json written, killed before epoch 1 ended
    (resumed / "metrics.jsonl").write_text('{"epoch": 1, "tor')
    assert train.main(["--resume", str(resumed), "--no-progress"]) == 0
    _assert_same_state(straight, resumed)


def test_sigkill_at_a_random_moment_then_resume(straight, data, teacher_ckpt, tmp_path):
    """A real process killed with SIGKILL somewhere in epoch 2 or 3 (or while saving), then resumed."""
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "rslad_fast.train", *_args("rslad", data, killed, teacher_ckpt)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(
        [sys.executable, "-m", "rslad_fast.train", "--resume", str(killed), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert not list(killed.glob(".*.tmp-*"))  # a temporary torn by the kill is cleaned up, never read
    _assert_same_state(straight, killed)


def test_sigterm_stops_cleanly_with_the_resume_hint(straight, data, teacher_ckpt, tmp_path):
    """SIGTERM, what schedulers send, is handled like Ctrl-C: a clean stop, one line saying how to continue,
    the lock released (before: killed by the signal, no message)."""
    stopped = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "rslad_fast.train", *_args("rslad", data, stopped, teacher_ckpt)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (stopped / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert "Traceback" not in stderr and f"--resume {stopped}" in stderr.strip().splitlines()[-1], stderr
    assert not (stopped / ".lock").exists() and not list(stopped.glob(".*.tmp-*"))
    assert train.main(["--resume", str(stopped), "--no-progress"]) == 0
    _assert_same_state(straight, stopped)


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, target)

    def crash(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        from rslad_fast.engine.checkpoint import atomic_write

        atomic_write(target, crash)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_resume_refuses_a_changed_teacher_file(data, teacher_ckpt, tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_ckpt.read_bytes())
    run_dir = tmp_path / "run"
    args = _args("rslad", data, run_dir, teacher_ckpt)
    args[args.index(str(teacher_ckpt))] = str(teacher)
    run(_start(args), run_dir, progress=False, stop_after=1)
    other = torch.load(teacher, weights_only=True)
    other["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["model"].items()}
    torch.save(other, teacher)
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir), "--no-progress"]) == 2
    assert "changed since the run started" in capsys.readouterr().err
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1  # untouched


# ---- a last.pt with the right keys and the wrong content: one line each, nothing run ------------------------


def _tamper(name):
    """How each case changes a genuine last.pt (a dict), and what its one line must say."""

    def set_(*path, value):
        def f(ck):
            d = ck
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value

        return f

    def drop(*path):
        def f(ck):
            d = ck
            for k in path[:-1]:
                d = d[k]
            del d[path[-1]]

        return f

    import argparse

    return {
        "wrong shape": (set_("model", "conv1.weight", value=torch.zeros(16, 3, 5, 5)), "conv1.weight"),
        "100 classes": (
            lambda ck: ck["model"].update({"linear.weight": torch.zeros(100, 32), "linear.bias": torch.zeros(100)}),
            "linear.weight",
        ),
        "missing weight": (drop("model", "bn1.running_var"), "bn1.running_var"),
        "nan weight": (set_("model", "linear.bias", value=lambda t: t * float("nan")), "NaN"),
        "missing rng": (drop("rng", "numpy"), "RNG"),
        "short torch rng": (set_("rng", "torch", value=lambda t: t[:100]), "RNG"),
        "short python rng": (set_("rng", "python", value=lambda s: (s[0], tuple(s[1])[:50], s[2])), "RNG"),
        "short generator": (set_("rng", "train_generators", value=lambda g: [t[:8] for t in g]), "RNG"),
        "world size": (set_("rng", "world_size", value="two"), "RNG"),
        "float epoch": (set_("epoch", value=1.5), "epoch"),
        "negative epoch": (set_("epoch", value=-2), "epoch"),
        "epoch past the end": (set_("epoch", value=7), "epoch"),
        "best_acc": (set_("best_acc", value="high"), "best_acc"),
        "optimizer groups": (set_("optimizer", "param_groups", value=[]), "optimizer"),
        "momentum shape": (set_("optimizer", "state", 0, "momentum_buffer", value=torch.zeros(3)), "optimizer"),
        "optimizer lr": (lambda ck: ck["optimizer"]["param_groups"][0].update(lr="fast"), "optimizer"),
        "scheduler": (set_("scheduler", value="x"), "lr schedule"),
        "scheduler epoch": (set_("scheduler", "last_epoch", value=0), "lr schedule"),
        "unsafe object": (set_("config", value=lambda c: {**c, "note": argparse.Namespace(x=1)}), "safe load refuses"),
    }[name]


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory):
    """A natural run of 3 epochs stopped after epoch 1: a genuine last.pt to resume from."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    args = ["--method", "natural", "--data", str(data), "--out", str(out), *COMMON]
    run(_start(args), out, progress=False, stop_after=1)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "wrong shape",
        "100 classes",
        "missing weight",
        "nan weight",
        "missing rng",
        "short torch rng",
        "short python rng",
        "short generator",
        "world size",
        "float epoch",
        "negative epoch",
        "epoch past the end",
        "best_acc",
        "optimizer groups",
        "momentum shape",
        "optimizer lr",
        "scheduler",
        "scheduler epoch",
        "unsafe object",
    ],
)
def test_resume_refuses_a_last_pt_with_wrong_content(case, one_epoch, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch, run_dir)
    ck = torch.load(run_dir / "last.pt", weights_only=True)
    change, expected = _tamper(case)
    change(ck)
    torch.save(ck, run_dir / "last.pt")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"}
    capsys.readouterr()
    rc = train.main(["--resume", str(run_dir), "--no-progress"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, rc, captured.err)
    assert expected in lines[0] and "Traceback" not in captured.err + captured.out, (case, lines[0])
    if case == "unsafe object":
        assert "corrupt" not in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before, case  # nothing ran, nothing written


@pytest.mark.parametrize(
    "edit,says",
    [({"teacher_cache": "yes"}, "--teacher-cache must be"), ({"lr": -1}, "--lr must be"), ({"amp": "fp8"}, "--amp")],
)
def test_resume_validates_a_hand_edited_config(data, tmp_path, capsys, edit, says):
    """A config.json edited by hand got none of the checks a new run's flags get ("yes" acted as "on")."""
    run = tmp_path / "r"
    argv = ["--method", "natural", "--student", "tiny", "--data", str(data), "--out", str(run), "--epochs", "2"]
    assert train.main(argv + ["--eval-n", "8", "--threads", "1", "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, **edit}))
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and says in err[0], err
    assert (run / "last.pt").read_bytes() == before
