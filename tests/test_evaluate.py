"""`python -m rslad_fast.evaluate`: the Table 2 row per checkpoint, its files, its checks, its errors.

A tiny model is trained once per module (a few seconds) on the synthetic CIFAR-10 stand-in written in the
official layout, and saved the way the training engine saves: ``{'model': state_dict, ...}``, plus a run
dir with best.pt, last.pt and config.json. The command-line runs are subprocesses started together (each
pays the torch import), the finer checks call the module in-process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from rslad_fast import evaluate as ev
from rslad_fast.attacks.eval_attacks import PGD
from rslad_fast.attacks.registry import PRESETS
from rslad_fast.data import load_cifar10
from rslad_fast.evaluation.robustness import evaluate_model, ordering_warnings, sanity_check
from rslad_fast.evaluation.run import build_attacks

N = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, fake_cifar10, train_tiny):
    root = tmp_path_factory.mktemp("evaluate")
    data = fake_cifar10(n_train=200, n_test=64, seed=0)
    x, y = load_cifar10(data, train=True, download=False)
    model, opt = train_tiny(x.float() / 255, y, steps=40, batch=32, lr=0.05)
    sd = model.state_dict()
    (root / "ck").mkdir()
    ckpt = root / "ck" / "student.pt"
    torch.save({"model": sd, "epoch": 3, "optimizer": opt.state_dict()}, ckpt)

    run = root / "run"
    run.mkdir()
    torch.save({"model": sd, "epoch": 3}, run / "best.pt")
    torch.save({"model": sd, "epoch": 4}, run / "last.pt")
    (run / "config.json").write_text(json.dumps({"student": "tiny", "method": "natural", "epochs": 5}))

    no_ckpt = root / "run_no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text(json.dumps({"student": "tiny"}))
    no_cfg = root / "run_no_cfg"
    no_cfg.mkdir()
    torch.save({"model": sd}, no_cfg / "last.pt")
    return {
        "root": root,
        "data": data,
        "ckpt": ckpt,
        "run": run,
        "no_ckpt": no_ckpt,
        "no_cfg": no_cfg,
        "model": model.eval(),
    }


def _cli_cases(e):
    ck, data, root = str(e["ckpt"]), str(e["data"]), e["root"]
    common = ["--data", data, "--no-download", "--n", str(N), "--batch-size", "8"]
    return {
        # eps 16/255: the synthetic classes' colours lie far apart, the tiny model is fully robust at 8/255
        "ok": ["--ckpt", ck, "--arch", "tiny", "--attacks", "clean,fgsm,pgd20-sat", "--eps", "16/255"] + common,
        "missing_ckpt": ["--ckpt", str(root / "nope.pt"), "--arch", "tiny", "--out", str(root / "o1")] + common,
        "wrong_arch": ["--ckpt", ck, "--arch", "resnet18", "--out", str(root / "o2")] + common,
        "unknown_attack": ["--ckpt", ck, "--arch", "tiny", "--attacks", "clean,pgd7", "--out", str(root / "o3")],
        "n_zero": ["--ckpt", ck, "--arch", "tiny", "--n", "0", "--out", str(root / "o4")],
        "missing_data": [
            "--ckpt",
            ck,
            "--arch",
            "tiny",
            "--data",
            str(root / "no_data"),
            "--no-download",
            "--out",
            str(root / "o5"),
        ],
        "run_no_ckpt": ["--run", str(e["no_ckpt"])] + common,
        "run_no_config": ["--run", str(e["no_cfg"])] + common,
    }


@pytest.fixture(scope="module")
def cli(env):
    """Every command-line case, run concurrently (one thread each: they share 2 cores): name -> (returncode,
    stdout, stderr)."""
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "rslad_fast.evaluate"] + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=env["root"],
            env=child_env,
        )
        for name, args in _cli_cases(env).items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    return out


# ----------------------------------------------------------------------------- the command line, end to end


def test_cli_end_to_end_on_a_training_checkpoint(env, cli):
    rc, stdout, stderr = cli["ok"]
    assert rc == 0, stderr
    assert "| checkpoint | model | method | Clean | FGSM | PGD_SAT | Worst (all ran) |" in stdout
    assert "| student.pt | tiny |" in stdout
    report = json.loads((env["ckpt"].parent / "eval.json").read_text())  # default --out: next to the ckpt
    md = (env["ckpt"].parent / "eval.md").read_text()
    assert "| checkpoint | model | method | Clean | FGSM | PGD_SAT |" in md and "Worst (all ran)" in md
    assert report["format"] == "rslad_fast.eval/1"
    assert report["columns"] == ["clean", "fgsm", "pgd20-sat"]
    assert report["n"] == N and report["seed"] == 0 and report["device"] == "cpu"
    assert report["torch"] == torch.__version__ and report["time"]["seconds"] > 0
    cfg = report["config"]
    assert cfg["eps"] == 16 / 255
    assert cfg["attacks"]["pgd20-sat"] == PRESETS["pgd20-sat"](eps=16 / 255).hparams()
    (row,) = report["rows"]
    acc = row["accuracy"]
    assert set(acc) == {"clean", "fgsm", "pgd20-sat", "worst"}
    assert acc["clean"] >= 70
    assert acc["clean"] > acc["pgd20-sat"]  # the attacks were applied
    assert acc["clean"] >= acc["fgsm"] >= acc["pgd20-sat"] >= acc["worst"]
    assert row["correct"]["clean"] == round(acc["clean"] * N / 100)
    assert 8 / 255 < row["max_linf"]["pgd20-sat"] <= 16 / 255 + 1e-6
    assert row["arch"] == "tiny" and row["checkpoint"] == str(env["ckpt"])
    assert "Traceback" not in stderr


BAD = {  # case -> what the one error line must say
    "missing_ckpt": "no such file",
    "wrong_arch": "does not match architecture 'resnet18'",
    "unknown_attack": "unknown attack(s) 'pgd7'",
    "n_zero": "--n",
    "missing_data": "CIFAR-10 not found",
    "run_no_ckpt": "no checkpoint",
    "run_no_config": "no config.json",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line_and_status_2(env, cli, case):
    rc, stdout, stderr = cli[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert BAD[case] in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    # nothing written: no --out folder created, nothing in the run dirs
    assert not any((env["root"] / f"o{i}").exists() for i in range(1, 6))
    assert not list(env["no_ckpt"].glob("eval.*")) and not list(env["no_cfg"].glob("eval.*"))


def _main(argv, capsys):
    try:
        rc = ev.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--ckpt", "x.pt", "--arch", "tiny", "--eps", "2"], "must be in [0, 1]"),
        (["--ckpt", "x.pt", "--arch", "tiny", "--eps", "8/0"], "not a number"),
        (["--ckpt", "x.pt"], "--ckpt needs --arch"),
        (["--arch", "tiny"], "one of the arguments --run --ckpt is required"),
        (["--ckpt", "{ck}", "--arch", "vgg16"], "unknown architecture 'vgg16'"),
        (["--ckpt", "{ck}", "--arch", "tiny", "--batch-size", "0"], "--batch-size"),
        (["--ckpt", "{ck}", "--arch", "tiny", "--pgd-sat-alpha", "-1"], "must be >= 0"),
        (["--run", "{run}", "--arch", "resnet18"], "disagrees"),
        (["--run", "{root}/nowhere"], "no such directory"),
    ],
)
def test_more_bad_inputs_in_process(env, capsys, argv, says):
    argv = [a.format(ck=env["ckpt"], run=env["run"], root=env["root"]) for a in argv]
    rc, out, err = _main(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not list(env["run"].glob("eval.*"))


# ----------------------------------------------------------------------------- in-process: the finer points


def test_run_dir_evaluates_best_and_last(env, capsys):
    rc, out, err = _main(
        [
            "--run",
            env["run"],
            "--attacks",
            "clean,fgsm",
            "--n",
            N,
            "--data",
            env["data"],
            "--no-download",
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 0, err
    report = json.loads((env["run"] / "eval.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["best", "last"]
    assert all(r["arch"] == "tiny" and r["method"] == "natural" for r in report["rows"])
    assert report["rows"][0]["accuracy"] == report["rows"][1]["accuracy"]  # same weights, same seeds
    assert "last holds the same weights as best: evaluated once" in report["notes"]
    assert "| best | tiny | natural |" in out and "| last | tiny | natural |" in out
    assert (env["run"] / "eval.md").is_file()
    for p in env["run"].glob("eval.*"):
        p.unlink()


def test_eps_zero_reproduces_clean_accuracy_exactly(env, capsys):
    out_dir = env["root"] / "eps0"
    rc, out, err = _main(
        [
            "--ckpt",
            env["ckpt"],
            "--arch",
            "tiny",
            "--eps",
            "0",
            "--n",
            N,
            "--data",
            env["data"],
            "--attacks",
            "clean,fgsm,pgd20-sat,pgd20-trades,cw",
            "--pgd-sat-steps",
            2,
            "--pgd-trades-steps",
            2,
            "--cw-steps",
            2,
            "--no-progress",
            "--out",
            out_dir,
            "--no-download",
        ],
        capsys,
    )
    assert rc == 0, err
    (row,) = json.loads((out_dir / "eval.json").read_text())["rows"]
    assert set(row["accuracy"].values()) == {row["accuracy"]["clean"]}
    assert set(row["correct"].values()) == {row["correct"]["clean"]}
    assert not row["warnings"]


def test_cli_defaults_are_the_attack_defaults():
    args = ev.build_parser().parse_args(["--ckpt", "x.pt", "--arch", "tiny"])
    assert args.attacks == ["clean", "fgsm", "pgd20-sat", "pgd20-trades", "cw", "aa"]
    # --data: None is the run's data folder with --run, ./data with --ckpt (evaluation.run.make_plan)
    assert (args.n, args.eps, args.seed, args.data) == (10000, 8 / 255, 0, None)
    try:
        import pyautoattack  # noqa: F401
    except ImportError:  # the AA adapter refuses to load without it; the other defaults still count
        args.attacks.remove("aa")
    made = build_attacks(ev.settings_from_args(args))
    for name, factory in PRESETS.items():
        assert made[name].hparams() == factory().hparams(), name
    if "aa" in made:
        assert made["aa"].hparams()["eps"] == 8 / 255
    assert ev.build_parser().parse_args(["--run", "r", "--eps", "4/255"]).eps == 4 / 255


def test_worst_is_the_per_image_and(env):
    model = env["model"]
    x, y = load_cifar10(env["data"], train=False, download=False)
    attacks = {"fgsm": PRESETS["fgsm"](eps=16 / 255), "pgd20-sat": PRESETS["pgd20-sat"](eps=16 / 255, steps=3)}
    res = evaluate_model(model, x[:N], y[:N], attacks, batch_size=6, device="cpu", seed=1)
    expected = res["clean"]["correct"] & res["fgsm"]["correct"] & res["pgd20-sat"]["correct"]
    assert torch.equal(res["worst"]["correct"], expected)
    assert res["worst"]["accuracy"] == 100.0 * int(expected.sum()) / N


def test_ordering_warnings():
    ok = {"clean": 80.0, "fgsm": 55.0, "pgd20-sat": 50.0, "pgd20-trades": 51.0, "cw": 49.0, "aa": 47.0}
    assert ordering_warnings(ok, 0.5) == []
    assert ordering_warnings({**ok, "aa": 50.3}, 0.5) == []  # within tolerance
    bad = ordering_warnings({**ok, "aa": 53.0}, 0.5)
    assert len(bad) == 2 and all(w.startswith("AA (53.00) is above PGD_") for w in bad)
    assert ordering_warnings({"clean": 40.0, "fgsm": 45.0}, 0.5)[0].startswith("FGSM (45.00) is above Clean")
    assert ordering_warnings({"clean": 80.0, "cw": 85.0}, 0.5) == []  # CW is not in the chain


class _ReversedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _Masked(torch.nn.Module):
    """A model whose input gradient points the wrong way: PGD then descends the loss (a broken attack)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(_ReversedGradient.apply(x))


def test_sanity_check_flags_a_broken_attack(env):
    x, y = load_cifar10(env["data"], train=False, download=False)
    sanity = PGD(eps=1.0, alpha=0.1, steps=5, name="sanity")
    good = evaluate_model(env["model"], x[:N], y[:N], {}, batch_size=N, device="cpu", sanity=sanity)
    entry, warning = sanity_check(sanity, good["sanity"]["accuracy"], 10)
    assert entry["ok"] and warning is None and entry["accuracy"] <= 10.0
    bad = evaluate_model(_Masked(env["model"]), x[:N], y[:N], {}, batch_size=N, device="cpu", sanity=sanity)
    entry, warning = sanity_check(sanity, bad["sanity"]["accuracy"], 10)
    assert not entry["ok"] and "above chance" in warning
    assert bad["worst"]["accuracy"] == bad["clean"]["accuracy"]  # the sanity run is not part of "worst"


def test_cli_with_autoattack_and_sanity(env, capsys):
    """AA through the command line, kept fast: at eps 0.5 APGD-CE breaks every image and AutoAttack skips
    the rest (its four attacks on surviving points take minutes on a CPU)."""
    pytest.importorskip("pyautoattack")
    out_dir = env["root"] / "aa"
    rc, out, err = _main(
        [
            "--ckpt",
            env["ckpt"],
            "--arch",
            "tiny",
            "--eps",
            "0.5",
            "--n",
            8,
            "--data",
            env["data"],
            "--attacks",
            "clean,aa",
            "--sanity",
            "--sanity-steps",
            10,
            "--no-progress",
            "--out",
            out_dir,
            "--no-download",
        ],
        capsys,
    )
    assert rc == 0, err
    report = json.loads((out_dir / "eval.json").read_text())
    (row,) = report["rows"]
    assert row["accuracy"]["aa"] == 0.0 and row["accuracy"]["worst"] == 0.0
    assert row["sanity"]["ok"] and row["sanity"]["eps"] == 1.0
    aa = report["config"]["autoattack"]
    assert aa["attacks_to_run"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["eps"] == 0.5
    assert aa["apgd-t"]["n_target_classes"] == 9 and aa["square"]["n_queries"] == 5000
    assert report["pyautoattack"] == "0.2.0"
    assert "| Clean | AA | Worst (all ran) |" in out


def test_n_default_uses_the_whole_smaller_test_set_and_an_explicit_n_too_large_is_an_error(env, capsys):
    """One rule with train's --eval-n: the default (10000) on a 64-image test set evaluates all 64 and says
    so; an explicit --n over 64 is an error (before: both clamped silently)."""
    out_dir = env["root"] / "n_rule"
    common = [
        "--ckpt",
        env["ckpt"],
        "--arch",
        "tiny",
        "--attacks",
        "clean",
        "--data",
        env["data"],
        "--no-download",
        "--no-progress",
        "--out",
        out_dir,
    ]
    rc, out, err = _main(common + ["--n", 65], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--n 65" in lines[0] and "64" in lines[0], err
    assert not out_dir.exists()
    rc, out, err = _main(common, capsys)
    assert rc == 0, err
    report = json.loads((out_dir / "eval.json").read_text())
    assert report["n"] == 64 and report["rows"][0]["correct"]["clean"] <= 64
    assert any("64" in note and "whole test set" in note for note in report["notes"]), report["notes"]
    assert "whole test set" in out


def test_run_is_evaluated_on_the_data_folder_its_config_names(tmp_path, fake_cifar100, monkeypatch, capsys):
    """Issue 22 item 7: ``--run`` takes the run's data folder from its config.json (as its data set), so a
    run trained with ``--data c100`` evaluates without ``--data``; an explicit ``--data`` wins; a folder that
    has moved since is one line naming config.json and --data."""
    from rslad_fast.models import build

    data = fake_cifar100(n_train=16, n_test=16, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save({"model": build("tiny", 100).state_dict(), "epoch": 1}, run / "last.pt")
    config = {"student": "tiny", "method": "natural", "dataset": "cifar100", "data": str(data)}
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)  # ./data holds no CIFAR-100 here
    argv = ["--run", str(run), "--attacks", "clean", "--n", "8", "--no-download", "--no-progress"]
    assert ev.main(argv) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["config"]["data"] == str(data) and report["data"]["root"] == str(data)
    capsys.readouterr()

    elsewhere = tmp_path / "elsewhere"
    assert ev.main([*argv, "--data", str(elsewhere)]) == 2  # the flag wins over config.json
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: CIFAR-100 not found at {elsewhere}") and len(err.splitlines()) == 1, err

    (run / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "moved")}))
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"not found at {tmp_path / 'moved'}" in err and len(err.splitlines()) == 1, err
    assert err.endswith(f"(the data folder {run / 'config.json'} names; pass --data DIR where it is now)"), err
