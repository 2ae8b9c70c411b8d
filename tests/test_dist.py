"""Multi-process training (torchrun, DDP) on the CPU with gloo: 2 processes == 1 process with the combined batch.

Every multi-process run here is a real `torchrun --standalone` (a free port of its own, so tests running side by
side never collide), of either `-m rslad_fast.train` or this file as a script: `python tests/test_dist.py
[--no-bn] [--no-augment] [--stop-after N] [--fail-rank R] -- TRAIN_ARGS` runs `train.main(TRAIN_ARGS)` with
test-only changes patched in (see `_worker`), e.g. a model without BatchNorm, so that the two runs can be
compared weight for weight.

Why the equivalence holds: DistributedSampler's strided shards make the two ranks' b-th batches together
exactly the single process's b-th batch of twice the size; every loss is a batch mean, so averaging the two
ranks' gradients (DDP) gives the gradient of the combined batch; the SGD step is then the same. What could
break it is kept out: BatchNorm (batch statistics differ per half: a model without it), augmentation (drawn
per rank: off), and the attack's random start (RSLAD with init_std = 0: x' starts at x).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rslad_fast import train
from rslad_fast.engine import build as engine_build
from rslad_fast.engine import runner
from rslad_fast.engine.dist import Dist
from rslad_fast.models import build

HERE = Path(__file__).resolve()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--device", "cpu", "--threads", "1", "--eval-n", "16", "--no-progress"]
TIMEOUT = 240  # s per torchrun launch: a hang fails the test instead of blocking the suite


class NoBN(torch.nn.Module):
    """Conv-ReLU x2, global pooling, linear: ~1.6k parameters and no BatchNorm (see the module doc)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.linear = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.conv2(self.conv1(x).relu()).relu()
        return self.linear(out.mean(dim=(2, 3)))


def _patch(setattr_, *, no_bn: bool, no_augment: bool):
    """The test-only changes, applied with `setattr_(obj, name, value)` (monkeypatch or plain setattr)."""
    if no_bn:
        real_build = engine_build.build_model
        setattr_(
            engine_build, "build_model", lambda name, *a, **k: NoBN() if name == "tiny" else real_build(name, *a, **k)
        )
    if no_augment:
        real_loader = runner.make_loader
        setattr_(runner, "make_loader", lambda *a, **k: real_loader(*a, **{**k, "augment": False}))


def _worker(argv) -> int:
    """Entry point when torchrun runs this file: patch, then train.main like `-m rslad_fast.train`."""
    import argparse
    import functools

    from rslad_fast.engine import train_run

    p = argparse.ArgumentParser()
    p.add_argument("--no-bn", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--stop-after", type=int)  # as if killed right after that epoch's checkpoint
    p.add_argument("--fail-rank", type=int)  # this rank alone fails its checks
    split = argv.index("--")
    opts, train_args = p.parse_args(argv[:split]), argv[split + 1 :]
    _patch(setattr, no_bn=opts.no_bn, no_augment=opts.no_augment)
    if opts.stop_after is not None:
        train_run.run = functools.partial(runner.run, stop_after=opts.stop_after)
    if opts.fail_rank is not None and int(os.environ["RANK"]) == opts.fail_rank:
        from rslad_fast.errors import UserError

        def fail(*a, **k):
            raise UserError("this rank cannot see the data")

        train_run.prepare = fail
    return train.main(train_args)


def _torchrun(args, *, timeout=TIMEOUT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*TORCHRUN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _our_error_lines(stderr):
    """Our one-line errors (torchrun adds its own failure report around them)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _no_traceback_of_ours(output):
    assert "rslad_fast/" not in "".join(l for l in output.splitlines() if l.lstrip().startswith("File ")), output


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=128, n_test=16, seed=2)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A fixed, seeded tiny teacher: untrained, its last layer scaled up for confident soft labels (a target
    as good as any for this test, with gradients large enough to move the student visibly)."""
    torch.manual_seed(3)
    teacher = build("tiny")
    with torch.no_grad():
        teacher.linear.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return path


# ---- 2 processes == 1 process with the combined batch ----------------------------------------------------


def test_two_processes_match_one_process_with_the_combined_batch(data, teacher_ckpt, tmp_path, monkeypatch):
    method = [
        "--method",
        "rslad",
        "--student",
        "tiny",
        "--teacher",
        str(teacher_ckpt),
        "--teacher-arch",
        "tiny",
        "--init-std",
        "0",
        "--steps",
        "2",
        "--data",
        str(data),
        "--epochs",
        "2",
        "--milestones",
        "1",
        *COMMON,
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    res = _torchrun([str(HERE), "--no-bn", "--no-augment", "--", *method, "--batch-size", "16", "--out", str(two)])
    assert res.returncode == 0, res.stdout + res.stderr

    _patch(monkeypatch.setattr, no_bn=True, no_augment=True)
    assert train.main([*method, "--batch-size", "32", "--out", str(one)]) == 0

    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (two, one))
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    assert not any("module." in k for k in a["model"])  # the plain module's state_dict, loadable anywhere
    torch.manual_seed(0)  # the run's seed: its initial weights
    start = NoBN().state_dict()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
        assert (b["model"][key] - start[key]).abs().max() > 1e-3, key  # training moved it: the check means something
    for (_, sa), (_, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=1e-5, atol=1e-6)
    ra, rb = _records(two), _records(one)
    assert [r["world_size"] for r in ra] == [2, 2] and [r["world_size"] for r in rb] == [1, 1]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)  # the mean over both ranks
        assert x["train_acc_nat"] == pytest.approx(y["train_acc_nat"], abs=1e-9)
        assert x["eval_n"] == y["eval_n"] == 16
        assert x["clean_acc"] == y["clean_acc"]  # each held image counted once, on one rank
    assert a["rng"]["world_size"] == 2 and len(a["rng"]["train_generators"]) == 2


def test_two_processes_with_the_teacher_cache_match_one_uncached(data, teacher_ckpt, tmp_path, monkeypatch):
    """Each rank keeps its own cache of the whole set (its shard changes every epoch): the cached 2-process run
    trains as the uncached single process with the combined batch (rtol 1e-5: served logits are a fresh
    forward's up to rounding, tests/test_teacher_cache.py)."""
    method = [
        "--method",
        "rslad",
        "--student",
        "tiny",
        "--teacher",
        str(teacher_ckpt),
        "--teacher-arch",
        "tiny",
        "--init-std",
        "0",
        "--steps",
        "1",
        "--data",
        str(data),
        "--epochs",
        "3",
        "--milestones",
        "2",
        *COMMON,
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    res = _torchrun(
        [
            str(HERE),
            "--no-bn",
            "--no-augment",
            "--",
            *method,
            "--teacher-cache",
            "on",
            "--batch-size",
            "16",
            "--out",
            str(two),
        ]
    )
    assert res.returncode == 0, res.stdout + res.stderr

    _patch(monkeypatch.setattr, no_bn=True, no_augment=True)
    assert train.main([*method, "--teacher-cache", "off", "--batch-size", "32", "--out", str(one)]) == 0
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (two, one))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    ra = _records(two)
    rates = [r["teacher_cache_hit_rate"] for r in ra]
    # no augmentation: one view per image; a rank's shard in epoch e+1 overlaps what it saw before
    assert rates[0] == 0.0 and 0.0 < rates[1] < rates[2] <= 1.0, rates
    assert [r["teacher_forwards_saved"] for r in ra] == [round(r * 128) for r in rates]  # both ranks' images
    for x, y in zip(ra, _records(one)):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


# ---- the real command line under torchrun ----------------------------------------------------------------


def test_torchrun_end_to_end_rank_zero_writes_once(data, tmp_path):
    """A self-trained teacher (trained under DDP too, written by rank 0, loaded by both), then RSLAD."""
    run = tmp_path / "run"
    res = _torchrun(
        [
            "-m",
            "rslad_fast.train",
            "--preset",
            "quick",
            "--method",
            "rslad",
            "--student",
            "tiny",
            "--teacher-arch",
            "tiny",
            "--train-n",
            "128",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--data",
            str(data),
            "--out",
            str(run),
            *COMMON,
        ]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _no_traceback_of_ours(res.stdout + res.stderr)
    assert res.stdout.count(f"run {run}:") == 1 and "batch 16 x 2 processes = 32" in res.stdout
    assert res.stdout.count(f"done {run}:") == 1
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.json",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
        "teacher",
    ]
    assert sorted(p.name for p in (run / "teacher").iterdir()) == [
        "best.pt",
        "config.json",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
    ]
    assert [r["epoch"] for r in _records(run)] == [1, 2]  # one line per epoch: one writer
    teacher_epochs = train.PRESETS["quick"].teacher_epochs  # the teacher's run is sized by the preset
    assert [r["epoch"] for r in _records(run / "teacher")] == list(range(1, teacher_epochs + 1))
    assert all(r["world_size"] == 2 for r in _records(run) + _records(run / "teacher"))
    ck = torch.load(run / "last.pt", weights_only=True)
    build("tiny").load_state_dict(ck["model"])  # BatchNorm buffers included, no DDP prefix
    assert ck["epoch"] == 2 and ck["rng"]["world_size"] == 2
    assert json.loads((run / "config.json").read_text())["batch_size"] == 16  # per process, as given

    # python -m rslad_fast.evaluate under torchrun: each rank attacks half the images, rank 0 reports them
    # all; clean and FGSM have no randomness, so the counts must be exactly the single process's
    ev_args = ["--attacks", "clean,fgsm", "--data", str(data), "--device", "cpu", "--no-progress"]
    res = _torchrun(
        [
            "-m",
            "rslad_fast.evaluate",
            "--run-dir",
            str(run / "teacher"),
            "--n-images",
            "15",
            "--out",
            str(tmp_path / "ev2"),
            *ev_args,
        ]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("wrote ") == 1
    from rslad_fast import evaluate

    assert evaluate.main(["--run", str(run / "teacher"), "--n", "15", "--out", str(tmp_path / "ev1"), *ev_args]) == 0
    two, one = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("ev2", "ev1"))
    assert (two["world_size"], one["world_size"], two["n"], one["n"]) == (2, 1, 15, 15)  # 15: uneven halves
    assert [r["correct"] for r in two["rows"]] == [r["correct"] for r in one["rows"]]
    assert any(r["correct"]["clean"] > 3 for r in one["rows"])  # a model that classifies: the check means something


def test_resume_with_another_world_size(data, tmp_path):
    """Killed after epoch 1 of a 2-process run (tiny, with BatchNorm), continued by one process."""
    run = tmp_path / "run"
    args = [
        "--method",
        "trades",
        "--student",
        "tiny",
        "--steps",
        "2",
        "--epochs",
        "2",
        "--milestones",
        "1",
        "--batch-size",
        "16",
        "--data",
        str(data),
        "--out",
        str(run),
        *COMMON,
    ]
    res = _torchrun([str(HERE), "--stop-after", "1", "--", *args])
    assert res.returncode == 0, res.stdout + res.stderr
    first = torch.load(run / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and first["rng"]["world_size"] == 2

    assert train.main(["--resume", str(run), "--no-progress"]) == 0
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["rng"]["world_size"] == 1
    assert [(r["epoch"], r["world_size"]) for r in _records(run)] == [(1, 2), (2, 1)]
    assert [r["lr"] for r in _records(run)] == pytest.approx([0.1, 0.01])  # the scheduler state continued
    assert any(not torch.equal(first["model"][k], last["model"][k]) for k in first["model"])


# ---- bad input under torchrun: one line, every rank exits, nothing written --------------------------------


def test_bad_input_under_torchrun_fails_cleanly_on_every_rank(data, tmp_path):
    base = [
        "--method",
        "natural",
        "--student",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--data",
        str(data),
        *COMMON,
    ]
    cases = {
        "sync-bn on the cpu": (["-m", "rslad_fast.train", *base, "--sync-bn"], "--sync-bn needs CUDA"),
        "cuda without GPUs": (
            ["-m", "rslad_fast.train", *base, "--device", "cuda"],
            "CUDA" if torch.cuda.device_count() < 2 else None,
        ),
        "one rank fails": ([str(HERE), "--fail-rank", "1", "--", *base], "rank 1: this rank cannot see the data"),
        # rank 0 alone takes the lock, after the checks: the ranks agree again, none waits in a collective
        "run dir in use": (["-m", "rslad_fast.train", *base], "in use by another process"),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    in_use = tmp_path / "run_dir_in_use"
    in_use.mkdir()
    held = open(in_use / ".lock", "a")
    import fcntl

    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for name, (args, _) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        procs[name] = (
            out,
            subprocess.Popen(
                [*TORCHRUN, *args, "--out", str(out)],
                env=env,
                cwd=HERE.parent,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for name, (out, p) in procs.items():
        stdout, stderr = p.communicate(timeout=TIMEOUT)  # no hang: torchrun returns once every rank exited
        expected = cases[name][1]
        if expected is None:  # a machine with 2+ GPUs trains fine here
            continue
        assert p.returncode != 0, (name, stdout, stderr)
        lines = _our_error_lines(stderr)
        assert len(lines) == 1 and expected in lines[0], (name, stderr)  # rank 0 says it, once
        assert "exitcode  : 2" in stderr, (name, stderr)  # our status, as torchrun reports it
        _no_traceback_of_ours(stdout + stderr)
        assert ([p.name for p in out.iterdir()] == [".lock"]) if out == in_use else not out.exists(), name
    held.close()


# ---- in-process pieces -----------------------------------------------------------------------------------


def test_dist_from_env():
    assert Dist.from_env({}) == Dist() and not Dist().launched and Dist().is_main
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    d = Dist.from_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launched, d.is_main) == (1, 2, 1, True, False)
    from rslad_fast.errors import UserError

    with pytest.raises(UserError, match="torchrun"):
        Dist.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="inconsistent"):
        Dist.from_env({**env, "RANK": "2"})
    assert d.device("cpu") == torch.device("cpu")
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match="CUDA device"):
            d.device("cuda")
    with pytest.raises(UserError, match="--device cuda"):
        d.device("cuda:0")


@pytest.mark.parametrize("n,world", [(200, 2), (201, 2), (7, 3), (1, 2)])
def test_evaluation_shards_cover_every_image_once(n, world):
    bounds = [Dist(rank=r, world_size=world, launched=True).shard(n) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


@pytest.fixture
def one_rank_group(one_thread):
    """A gloo process group of one process, in this process (DDP needs one), torn down afterwards; one
    thread (tiny tensors on 2 shared cores: threads only contend)."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


@pytest.mark.parametrize("method", ["natural", "sat", "trades", "mart", "ard", "iad", "rslad"])
def test_attacks_run_on_the_plain_module_under_ddp(method, one_rank_group):
    """Under DDP only the training forwards go through the wrapper; the step equals the plain one bitwise."""
    from rslad_fast import methods
    from rslad_fast.engine.step import train_step

    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    teacher = build("tiny").eval()
    m = methods.get(method)(
        **({"steps": 2} if "steps" in methods.get(method).HPARAMS else {}), **({"begin": 0} if method == "iad" else {})
    )
    results = []
    for wrap in (False, True):
        torch.manual_seed(1)
        module = build("tiny")
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        student = Dist(launched=True).wrap(module, torch.device("cpu")) if wrap else module
        calls = []
        student.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        loss, ctx = train_step(
            student,
            m,
            opt,
            x,
            y,
            teacher=teacher if m.needs_teacher else None,
            generator=torch.Generator().manual_seed(5),
        )
        assert ctx.attack_model is module and ctx.student is student
        results.append((loss, [p.detach().clone() for p in module.parameters()], len(calls)))
    (loss_a, params_a, calls_plain), (loss_b, params_b, calls_ddp) = results
    training_forwards = {"natural": 1, "sat": 1}.get(method, 2)
    assert calls_ddp == training_forwards  # none of the attack's passes went through DDP
    assert torch.equal(loss_a, loss_b) and all(torch.equal(p, q) for p, q in zip(params_a, params_b))


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process

    exit_process(_worker(sys.argv[1:]))
