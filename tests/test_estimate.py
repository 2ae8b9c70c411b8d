"""The time estimate (engine/estimate.py) and the lines `python -m rslad_fast.train` prints from it.

Tiny and CPU-only: the `tiny` model, 256 fake training images, one thread. The estimate must never change a
run: the global RNG streams and a later (or the same) run's weights are compared bitwise.
"""

import math
import random

import numpy as np
import pytest
import torch

from rslad_fast import train
from rslad_fast.engine import create_run_dir, estimate, prepare, run, runner
from rslad_fast.models import build

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--student", "tiny", "--threads", "1", "--eval-n", "32", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=64, seed=0)


def _cfg(*args):
    return train.resolve_config(train.build_parser().parse_args(list(args)))


def _rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_same_rng(a, b):
    assert a[0] == b[0]
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert torch.equal(a[2], b[2])


def _weights(run_dir):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    return ckpt["model"], ckpt["optimizer"]["state"]


def _assert_same_weights(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    for sa, sb in zip(oa.values(), ob.values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_fmt_duration():
    assert estimate.fmt_duration(45) == "45 s"
    assert estimate.fmt_duration(0.24) == "0.2 s"
    assert estimate.fmt_duration(12 * 60) == "12 min"
    assert estimate.fmt_duration(3.4 * 3600) == "3.4 h"
    assert estimate.fmt_duration(2.1 * 86400) == "2.1 days"
    assert estimate.fmt_duration(float("nan")) == "unknown"
    assert estimate.count(1, "epoch") == "1 epoch" and estimate.count(29716, "batch") == "29,716 batches"


def test_batches_per_epoch_counts_as_the_loaders_do():
    from rslad_fast.data import TensorLoader

    x, y = torch.zeros(250, 3, 32, 32, dtype=torch.uint8), torch.zeros(250, dtype=torch.long)
    for world in (1, 3):
        loader = TensorLoader(x, y, 64, train=True, device="cpu", seed=0, rank=0, world_size=world)
        assert estimate.batches_per_epoch(250, 64, world) == len(loader)
    assert estimate.batches_per_epoch(50000, 128) == 391


def test_measure_train_step_is_positive_and_leaves_no_trace(data, tmp_path):
    """A distillation step (RSLAD with a random tiny teacher) is timed; the RNG streams and the thread count
    are as before, and a training run after it is bitwise the run without it."""
    cfg = _cfg("--method", "rslad", "--teacher-arch", "tiny", "--data", str(data), *COMMON, "--steps", "2")
    assert cfg.teacher["source"] == "trained" and cfg.teacher["arch"] == "tiny"
    torch.manual_seed(123)
    before, threads = _rng_states(), torch.get_num_threads()
    s = estimate.measure_train_step(cfg, batches=1)
    assert math.isfinite(s) and s > 0
    _assert_same_rng(before, _rng_states())
    assert torch.get_num_threads() == threads

    args = ["--method", "trades", "--steps", "1", "--epochs", "1", "--data", str(data), *COMMON]
    assert train.main([*args, "--out", str(tmp_path / "plain")]) == 0
    trades = _cfg(*args)
    assert estimate.measure_train_step(trades) > 0
    assert train.main([*args, "--out", str(tmp_path / "after")]) == 0
    _assert_same_weights(_weights(tmp_path / "plain"), _weights(tmp_path / "after"))


def test_the_in_run_estimate_does_not_change_the_run(data, tmp_path, monkeypatch, capsys):
    """The estimate line's evaluation pass runs on the training student mid-epoch: bitwise the same weights
    as a run without it."""
    args = ["--method", "trades", "--steps", "1", "--epochs", "2", "--data", str(data), *COMMON]
    assert train.main([*args, "--out", str(tmp_path / "with")]) == 0
    assert "estimate: about" in capsys.readouterr().out
    monkeypatch.setattr(runner, "_log_estimate", lambda *a, **k: None)
    assert train.main([*args, "--out", str(tmp_path / "without")]) == 0
    assert "estimate: about" not in capsys.readouterr().out
    _assert_same_weights(_weights(tmp_path / "with"), _weights(tmp_path / "without"))


def test_measure_eval_seconds_leaves_the_model_as_it_was():
    cfg = _cfg("--method", "natural", *COMMON)
    torch.manual_seed(0)
    model = build("tiny").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s = estimate.measure_eval_seconds(cfg, images=64, model=model)
    assert math.isfinite(s) and s > 0
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert estimate.estimate_run(cfg, 0.5, 10, 3, eval_seconds=2.0) == pytest.approx(3 * (10 * 0.5 + 2.0))


def test_train_prints_the_teacher_note_and_each_runs_estimate(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        *("--preset", "quick", "--method", "rslad", "--teacher-arch", "tiny", "--train-n", "256"),
        *("--data", str(data), "--out", str(run_dir), "--epochs", "1", "--steps", "1", *COMMON),
    ]
    capsys.readouterr()
    assert train.main(args) == 0
    out = capsys.readouterr().out
    epochs = train.PRESETS["quick"].teacher_epochs  # 4; 256 images at batch 64: 4 batches an epoch
    assert (
        f"note: no --teacher: this run first trains its own tiny teacher with TRADES: {epochs} epochs x 4 batches "
        f"= {4 * epochs} batches, then 1 epoch x 4 batches of rslad" in out
    )
    lines = [line for line in out.splitlines() if "estimate: about" in line]
    assert len(lines) == 2, out
    assert lines[0].startswith("[teacher trades/tiny] estimate: about ")
    assert f"for the remaining {epochs} epochs x 4 batches (" in lines[0] and "s/batch on cpu, 1 threads" in lines[0]
    assert lines[0].endswith("then the student's run follows: rslad tiny, 1 epoch x 4 batches")
    assert lines[1].startswith("[rslad/tiny] estimate: about ") and "remaining 1 epoch x 4 batches" in lines[1]
    assert "per-epoch evaluation" in lines[1] and "then" not in lines[1]
    assert out.index(lines[0]) < out.index("[teacher trades/tiny] epoch 1/") < out.index(lines[1])
    assert "--preset quick trains" not in out  # a quick run on a CPU: no pointer to itself

    assert train.main(["--resume", str(run_dir), "--no-progress"]) == 0  # complete: no estimate, no note
    out = capsys.readouterr().out
    assert "already complete" in out and "estimate" not in out and "no --teacher" not in out


def test_a_resumed_run_estimates_its_remaining_epochs(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--method", "natural", "--epochs", "3", "--data", str(data), "--out", str(run_dir), *COMMON]
    prep = prepare(_cfg(*args))
    create_run_dir(run_dir, prep.cfg)
    run(prep, run_dir, progress=False, stop_after=1)  # as if killed after epoch 1
    assert "remaining 3 epochs x 4 batches" in capsys.readouterr().out
    assert train.main(["--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[natural/tiny] estimate: about " in out and "remaining 2 epochs x 4 batches" in out


@pytest.mark.parametrize("long", [False, True])
def test_the_cpu_pointer_appears_above_the_threshold_only(data, tmp_path, monkeypatch, capsys, long):
    if long:
        monkeypatch.setattr(estimate, "CPU_POINTER_SECONDS", 0.0)
    args = ["--method", "natural", "--epochs", "1", "--data", str(data), "--out", str(tmp_path / "run"), *COMMON]
    capsys.readouterr()
    assert train.main(args) == 0
    out = capsys.readouterr().out
    pointer = "[natural/tiny] on a CPU, --preset quick trains a CPU-sized run (about 17 min on 2 cores)"
    assert (pointer in out) == long, out
    assert "estimate: about" in out


@pytest.mark.parametrize("long", [False, True])
def test_a_long_cpu_run_points_to_the_quick_preset_before_it_starts(data, tmp_path, monkeypatch, capsys, long):
    """The design card's `train --student mnv2` on a CPU: 147,016 batches, minutes before the first estimate."""
    if long:
        monkeypatch.setattr(estimate, "CPU_LONG_BATCHES", 4)  # this run: 1 epoch x 4 batches
    args = ["--method", "natural", "--epochs", "1", "--data", str(data), "--out", str(tmp_path / "run"), *COMMON]
    capsys.readouterr()
    assert train.main(args) == 0
    out = capsys.readouterr().out
    note = (
        "note: 4 batches on a CPU: the time estimate follows once the first batches are timed; --preset quick "
        "trains a CPU-sized run (about 17 min on 2 cores)"
    )
    assert (note in out) == long, out
    assert (note in out.split("[natural/tiny] estimate")[0]) == long  # before training starts


def test_the_paper_schedule_counts_its_teacher():
    """The count behind the note, for the paper's mnv2 RSLAD with a self-trained WRN-34-10 teacher."""
    student, teacher = 300 * estimate.batches_per_epoch(50000, 128), 76 * estimate.batches_per_epoch(50000, 128)
    assert (student, teacher) == (117300, 29716)
    assert estimate.long_cpu_run_note("cpu", student + teacher).startswith("147,016 batches on a CPU")
    assert estimate.long_cpu_run_note("cuda", student + teacher) is None
    assert estimate.long_cpu_run_note("cpu", 4999) is None


def test_attack_pass_counts_follow_the_registry():
    from rslad_fast.attacks.registry import EVAL_ATTACKS

    assert estimate.attack_passes("clean") == (0, 1)
    assert estimate.attack_passes("fgsm") == (1, 1)
    assert estimate.attack_passes("pgd20-sat") == (EVAL_ATTACKS["pgd20-sat"].default("steps"), 1) == (20, 1)
    assert estimate.attack_passes("cw") == (30, 1)
    aa = estimate.attack_passes("aa")
    assert aa[0] == pytest.approx(100 + 0.6 * 1800) and aa[1] == pytest.approx(1 + 0.6 * 5900)
    # a run's own accuracies: APGD-CE on the 40% it classifies, the later attacks on the 20% still robust
    weak = estimate.attack_passes("aa", clean=0.4, robust=0.2)
    assert weak[0] == pytest.approx(0.4 * 100 + 0.2 * 1800) and weak[1] == pytest.approx(1 + 0.2 * 5900)
    assert estimate.attack_passes("pgd20-sat", clean=0.4, robust=0.2) == (20, 1)  # every point, whatever its fate
    with pytest.raises(ValueError, match="unknown attack"):
        estimate.attack_passes("pgd1000")


def test_eval_attack_seconds_is_positive_and_grows_with_n():
    before = _rng_states()
    small = estimate.eval_attack_seconds("tiny", ["fgsm", "pgd20-sat"], 8, "cpu", 8)
    large = estimate.eval_attack_seconds("tiny", ["fgsm", "pgd20-sat"], 800, "cpu", 8)
    assert 0 < small < large
    _assert_same_rng(before, _rng_states())
    assert estimate.eval_attack_seconds("tiny", ["aa"], 0, "cpu", 8) == 0.0
