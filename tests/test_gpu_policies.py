"""GPU-facing policies whose logic runs on the CPU: one TF32 policy for training and evaluation, and a clear
start-up error for a library built without CUDA kernels."""

import json

import pytest
import torch

import rslad_fast
from rslad_fast import engine, evaluate, ops, train
from rslad_fast.engine.resolution import check_ops_device
from rslad_fast.errors import UserError
from rslad_fast.evaluation import run as eval_run


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=64, n_test=16, seed=0)


def _flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_on():
    """torch's flags as a user (or torch's own cuDNN default) may leave them: TF32 allowed."""
    saved = _flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _spy_train_steps(monkeypatch):
    from rslad_fast.engine import loop

    seen, original = [], loop.train_step

    def spy(*a, **kw):
        seen.append(_flags())
        return original(*a, **kw)

    monkeypatch.setattr(loop, "train_step", spy)
    return seen


def _train(data, out, *extra):
    return train.main(
        [
            "--method",
            "natural",
            "--student",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--eval-n",
            "16",
            "--threads",
            "1",
            "--no-progress",
            *extra,
        ]
    )


# ---- TF32: off in training unless asked, as in evaluate; recorded; torch's flags restored ----------------


def test_training_runs_strict_fp32_by_default_and_records_it(data, tmp_path, monkeypatch, tf32_on):
    seen = _spy_train_steps(monkeypatch)
    assert _train(data, tmp_path / "run") == 0
    assert seen and set(seen) == {(False, False)}  # torch's default would have left cuDNN TF32 on
    assert _flags() == (True, True)  # restored for the caller
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["allow_tf32"] is False


def test_allow_tf32_applies_to_training_and_is_recorded(data, tmp_path, monkeypatch):
    seen = _spy_train_steps(monkeypatch)
    before = _flags()
    assert _train(data, tmp_path / "run", "--allow-tf32") == 0
    assert set(seen) == {(True, True)}
    assert _flags() == before
    assert json.loads((tmp_path / "run" / "config.json").read_text())["allow_tf32"] is True


def test_evaluate_uses_the_same_policy_and_records_it(data, tmp_path, monkeypatch, tf32_on):
    ckpt = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save({"model": rslad_fast.models.build("tiny").state_dict()}, ckpt)
    seen, original = [], eval_run.evaluate_model

    def spy(*a, **kw):
        seen.append(_flags())
        return original(*a, **kw)

    monkeypatch.setattr(eval_run, "evaluate_model", spy)
    argv = [
        "--ckpt",
        str(ckpt),
        "--arch",
        "tiny",
        "--data",
        str(data),
        "--no-download",
        "--n",
        "8",
        "--attacks",
        "clean",
        "--no-progress",
        "--out",
        str(tmp_path / "e"),
    ]
    assert evaluate.main(argv) == 0
    assert seen == [(False, False)] and _flags() == (True, True)
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["config"]["allow_tf32"] is False


# ---- a compiled library without CUDA kernels: one clear error at start --------------------------------------


def test_config_records_the_ops_backend(data, tmp_path):
    assert _train(data, tmp_path / "run") == 0
    versions = json.loads((tmp_path / "run" / "config.json").read_text())["versions"]
    assert versions["ops_backend"] == ops.backend()
    assert versions["ops_cuda_kernels"] == ops.cuda_kernels_available()


def test_ops_refuse_cuda_without_cuda_kernels(monkeypatch):
    if ops.backend() != "compiled":
        pytest.skip("the reference fallback runs on any device")
    monkeypatch.setattr(ops, "_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*RSLAD_FAST_CUDA=1"):
        ops.check_device("cuda")
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        ops.check_device(torch.device("cuda", 1))
    ops.check_device("cpu")  # the CPU kernels are always there


def test_training_and_evaluate_fail_at_start_without_cuda_kernels(data, tmp_path, monkeypatch):
    if ops.backend() != "compiled":
        pytest.skip("the reference fallback runs on any device")
    monkeypatch.setattr(ops, "_CUDA_KERNELS", False)
    args = train.build_parser().parse_args(
        ["--method", "natural", "--student", "tiny", "--data", str(data), "--device", "cpu"]
    )
    cfg = train.resolve_config(args)
    cfg.device = "cuda"  # as a resumed run's config.json would say; no GPU is needed to reach the check
    with pytest.raises(UserError, match="built without CUDA kernels") as e:
        engine.prepare(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="built without CUDA kernels"):
        check_ops_device("cuda:0")
    if torch.cuda.is_available():
        with pytest.raises(UserError, match="built without CUDA kernels"):
            eval_run._device("cuda")


@pytest.mark.parametrize("require,ok", [("compiled", True), ("cuda", None), ("bogus", False)])
def test_require_env_refuses_a_fallback_at_import(require, ok):
    """RSLAD_FAST_REQUIRE (set by the GPU check for every stage) turns a fallback into an import error."""
    import os
    import subprocess
    import sys

    if ok is None:  # "cuda": passes exactly when this build has CUDA kernels
        ok = ops.cuda_kernels_available()
    if ops.backend() != "compiled":
        ok = False
    done = subprocess.run(
        [sys.executable, "-c", "import rslad_fast"],
        capture_output=True,
        text=True,
        env={**os.environ, "RSLAD_FAST_REQUIRE": require},
        timeout=120,
    )
    assert (done.returncode == 0) == ok, done.stderr[-2000:]
    if not ok:
        assert "RSLAD_FAST_REQUIRE" in done.stderr


def test_cuda_graph_true_on_the_cpu_is_one_clear_error(data, tmp_path, capsys):
    """It raised a ValueError traceback from the first attack; now the config check refuses it."""
    rc = train.main(
        [
            "--method",
            "rslad",
            "--student",
            "tiny",
            "--teacher-arch",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r"),
            "--device",
            "cpu",
            "--cuda-graph",
            "true",
            "--epochs",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--cuda-graph true needs a CUDA device" in err[0]
    assert not (tmp_path / "r").exists()
