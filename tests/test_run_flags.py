"""The run-setting flags are defined once (rslad_fast/run_flags.py) and reach every command that starts runs:
a flag of `train` is a flag of `reproduce`, and its value reaches the sweep's runs, without `reproduce`
naming it."""

from __future__ import annotations

import argparse

import pytest

from rslad_fast import reproduce, run_flags, train
from rslad_fast.engine import RunSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def _dests(parser: argparse.ArgumentParser) -> set:
    return {a.dest for a in parser._actions if a.option_strings}


def test_every_run_setting_has_its_flag_in_train_and_reproduce():
    fields = set(RunSettings.__dataclass_fields__) - {"hparams"}
    train_dests, sweep_dests = _dests(train.build_parser()), _dests(reproduce.build_parser())
    assert fields <= train_dests
    # reproduce sets the student, method and preset per run, and has its own --teacher / --teacher-arch
    assert fields - {"student", "method", "preset", "teacher", "teacher_arch"} <= sweep_dests
    hparams = {d for d in train_dests if d.startswith(run_flags.HP_PREFIX)}
    assert hparams and hparams <= sweep_dests


def test_a_flag_reaches_the_sweeps_runs(fake_cifar10, tmp_path):
    """--no-fold-bn and --momentum (added to or present in run_flags only) reach each planned run's Config;
    a method hyperparameter reaches only the runs of the methods that have it."""
    data = fake_cifar10(n_train=128, n_test=32, seed=0)
    argv = ["--out", str(tmp_path / "s"), "--students", "tiny", "--methods", "sat,trades", "--preset", "quick"]
    argv += [
        "--data",
        str(data),
        "--no-fold-bn",
        "--momentum",
        "0.8",
        "--beta",
        "3",
        "--threads",
        "1",
        "--train-n",
        "128",
    ]
    plan = reproduce.make_plan(reproduce.build_parser().parse_args(argv))
    runs = {s.name: s.cfg for s in plan.stages if s.kind == "train"}
    assert {n: (c.fold_bn, c.momentum) for n, c in runs.items()} == {
        "sat-tiny": (False, 0.8),
        "trades-tiny": (False, 0.8),
    }
    assert runs["trades-tiny"].hparams["beta"] == 3 and "beta" not in runs["sat-tiny"].hparams
    assert plan.settings["train_flags"]["fold_bn"] is False and plan.settings["train_flags"]["hp_beta"] == 3


def test_settings_from_args_reads_what_was_given():
    args = train.build_parser().parse_args(["--student", "mnv2", "--lr", "0.05", "--eps", "4/255", "--no-fold-bn"])
    s = run_flags.settings_from_args(args)
    assert (s.student, s.lr, s.fold_bn, s.method) == ("mnv2", 0.05, False, None)
    assert s.hparams == {"eps": pytest.approx(4 / 255)}
    assert {run_flags.flag_of(k) for k in s.given()} == {"--student", "--lr", "--eps", "--fold-bn"}
