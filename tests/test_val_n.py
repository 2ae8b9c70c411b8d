"""``--val-n N``: N training images held out of training for the per-epoch evaluation and best.pt
(engine/validation.py): never in a training batch (any augmented view, the teacher-logit cache's keys), the same
images after a resume and on every rank under torchrun, best.pt following their PGD-20; the default path
(best.pt by the first eval_n test images) unchanged; the selection named in config.json, eval.json and the
reproduce table.

The data here codes each image's index in its pixels (:func:`write_indexed_cifar10`): a solid red and green
that a crop with zero padding and a flip keep as each channel's maximum, so every image a training step or the
per-epoch evaluation is given says which file image it is, augmented or not.

Run as a script under torchrun (``python tests/test_val_n.py --record DIR -- TRAIN_ARGS``) it trains through
``train.main`` with the same recording patched in, each rank writing what it saw to ``DIR/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if __name__ == "__main__":  # under torchrun: the package and this folder's helpers importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from fake_cifar import _dump, _Py2Str, write_fake_cifar10

from rslad_fast import engine, reproduce
from rslad_fast.data.augment import decode_views
from rslad_fast.data.cifar import TEST_FILES, TRAIN_FILES
from rslad_fast.data.loaders import SALT_EVAL, mix_seed
from rslad_fast.engine import RunDir, RunSettings, loop, resolve, runner, validation
from rslad_fast.engine.checkpoint import load_checkpoint
from rslad_fast.engine.config import Config
from rslad_fast.errors import UserError
from rslad_fast.models import build

HERE = Path(__file__).resolve()
N_TRAIN, N_TEST, VAL_N = 96, 24, 16
TINY = dict(student="tiny", device="cpu", threads=1, batch_size=32, eval_n=12)
TEST_MARK = 255  # the green of every test image: no training image of these sizes reaches it
_REAL = (loop.train_step, runner.evaluate)


def write_indexed_cifar10(root, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """The official CIFAR-10 layout (tests/fake_cifar.py writes it) with index-coded images: training image i
    has red 1 + i % 250 and green 1 + i // 250, test image j red 1 + j and green TEST_MARK; blue carries the
    label (i % 10), something for a model to learn. Returns the root to pass as --data."""
    out = write_fake_cifar10(root, n_train=n_train, n_test=n_test, seed=0)  # the layout and batches.meta
    for names, n, test in ((TRAIN_FILES, n_train, False), (TEST_FILES, n_test, True)):
        index = np.arange(n)
        labels = index % 10
        images = np.zeros((n, 3, 32, 32), np.uint8)
        images[:, 0] = (1 + index % 250)[:, None, None]
        images[:, 1] = (np.full(n, TEST_MARK) if test else 1 + index // 250)[:, None, None]
        images[:, 2] = (20 + 20 * labels)[:, None, None]
        for name, idx in zip(names, np.array_split(index, len(names))):
            _dump(
                {
                    _Py2Str("batch_label"): _Py2Str(name),
                    _Py2Str("labels"): labels[idx].tolist(),
                    _Py2Str("data"): images[idx].reshape(len(idx), -1),
                    _Py2Str("filenames"): [_Py2Str(f"indexed_{name}_{i}.png") for i in idx],
                },
                out / name,
            )
    return Path(root)


def decode(x: torch.Tensor) -> list:
    """("train" | "test", file index) of each image of a batch (float in [0, 1] or uint8), augmented or not."""
    x = x.float() * (255.0 if x.is_floating_point() else 1.0)
    top = x.round().to(torch.int64).amax(dim=(2, 3))  # a crop's zero padding never raises a channel's maximum
    out = []
    for red, green in top[:, :2].tolist():
        out.append(("test", red - 1) if green == TEST_MARK else ("train", red - 1 + 250 * (green - 1)))
    return out


class Recorder:
    """Patches the training step and the runner's per-epoch evaluation: every image each is given, decoded."""

    def __init__(self, setattr_):
        self.trained, self.view_images, self.evaluated = set(), set(), []
        real_step, real_eval = _REAL  # never another recorder's wrapper

        def step(student, method, optimizer, x, y, **kw):
            self.trained.update(decode(x))
            if kw.get("views") is not None:  # the teacher-logit cache's keys: indices into the run's training set
                self.view_images.update(decode_views(kw["views"].cpu())[0].tolist())
            return real_step(student, method, optimizer, x, y, **kw)

        def evaluate(model, images, labels, **kw):
            ev = real_eval(model, images, labels, **kw)
            self.evaluated.append((decode(images), ev))
            return ev

        setattr_(loop, "train_step", step)
        setattr_(runner, "evaluate", evaluate)

    def dump(self, path) -> None:
        evaluated = [[list(map(list, imgs)), ev] for imgs, ev in self.evaluated]
        doc = {"trained": sorted(self.trained), "evaluated": evaluated}
        Path(path).write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_indexed_cifar10(tmp_path_factory.mktemp("indexed"))


def _held_out(n=N_TRAIN, val_n=VAL_N) -> set:
    return {("train", int(i)) for i in validation.val_indices(n, val_n)}


# ---- the split -------------------------------------------------------------------------------------------


def test_the_split_is_rice_et_al_s_and_depends_on_nothing_else():
    # locuslab/robust_overfitting generate_validation.py, as written there: the global seed, then permutation
    np.random.seed(0)
    rice = np.random.permutation(50000)[:1000]
    torch.manual_seed(123)  # no other stream moves it
    assert np.array_equal(validation.val_indices(50000, 1000), rice)
    images = torch.arange(20, dtype=torch.uint8).reshape(20, 1, 1, 1).expand(20, 3, 32, 32)
    labels = torch.arange(20) % 10
    (train_x, train_y), (val_x, val_y) = validation.split((images, labels), 5)
    held = validation.val_indices(20, 5)
    assert sorted(val_x[:, 0, 0, 0].tolist()) == sorted(held.tolist()) and val_y.tolist() == (held % 10).tolist()
    kept = train_x[:, 0, 0, 0].tolist()
    assert kept == sorted(set(range(20)) - set(held.tolist()))  # the rest, in file order
    assert validation.split((images, labels), None) == ((images, labels), None)


def test_bad_val_n_is_one_user_error(data):
    with pytest.raises(UserError, match="--val-n must be an integer >= 1"):
        resolve(RunSettings(method="natural", data=str(data), val_n=0, epochs=1, **TINY))
    cfg = resolve(RunSettings(method="natural", data=str(data), val_n=N_TRAIN, epochs=1, **TINY))
    with pytest.raises(UserError, match=f"--val-n {N_TRAIN} leaves no training image"):
        engine.prepare(cfg)
    cfg = resolve(RunSettings(method="natural", data=str(data), val_n=VAL_N, train_n=N_TRAIN, epochs=1, **TINY))
    with pytest.raises(UserError, match=f"exceeds the {N_TRAIN - VAL_N} training images left after --val-n"):
        engine.prepare(cfg)


# ---- one process: never trained on, the same after a resume, best.pt by their PGD-20 ----------------------


def test_held_out_images_are_never_trained_on_and_pick_best_pt(data, tmp_path, monkeypatch, natural_teacher):
    teacher = natural_teacher(
        data, "--student", "tiny", "--train-n", "64", "--eval-n", "8", "--batch-size", "32", "--epochs", "1",
        "--device", "cpu", "--threads", "1", "--no-progress",
    )  # fmt: skip
    settings = RunSettings(
        method="rslad", teacher=str(teacher), teacher_arch="tiny", teacher_cache="on", data=str(data), val_n=VAL_N,
        epochs=3, **TINY,
    )  # fmt: skip
    cfg = resolve(settings)
    assert (cfg.val_n, cfg.best_selection) == (VAL_N, "validation")
    # a teacher file was trained elsewhere: the start line says it may have seen the held-out images
    assert any(n.startswith("--val-n 16: ") and "--teacher file" in n for n in engine.prepare(cfg).notes)
    out = tmp_path / "run"
    engine.create_run_dir(out, cfg)
    first = Recorder(monkeypatch.setattr)
    engine.run(engine.prepare(cfg), out, progress=False, stop_after=1)  # as if killed after epoch 1
    second = Recorder(monkeypatch.setattr)
    engine.resume(out, progress=False)

    held = _held_out()
    remaining = sorted(i for i in range(N_TRAIN) if ("train", i) not in held)
    for rec in (first, second):
        # every view of every batch (crops and flips included) is a training image that is not held out; all
        # of them are trained on
        assert rec.trained == {("train", i) for i in remaining}
        # the teacher-logit cache's keys (indices into the run's training set) point at the same images
        assert {remaining[i] for i in rec.view_images} == set(remaining)
        # every per-epoch evaluation saw exactly the held-out images, before and after the resume alike
        assert all(set(images) == held and len(images) == VAL_N for images, _ in rec.evaluated)
    assert len(first.evaluated) == 1 and len(second.evaluated) == 2

    rd = RunDir(out)
    records = rd.metrics_records()
    evaluated = [ev for rec in (first, second) for _, ev in rec.evaluated]
    assert [r["pgd20_acc"] for r in records] == [ev["pgd20_acc"] for ev in evaluated]
    best_so_far, flags = -1.0, []
    for r in records:
        flags.append(r["pgd20_acc"] > best_so_far)
        best_so_far = max(best_so_far, r["pgd20_acc"])
    assert [r["best"] for r in records] == flags
    best = load_checkpoint(rd.best)
    assert best["epoch"] == max(r["epoch"] for r in records if r["best"])
    # best.pt's weights give the PGD-20 its epoch recorded, on the held-out images (the evaluation's own stream)
    model = build("tiny")
    model.load_state_dict(best["model"])
    prep = engine.prepare(rd.read_config())
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, best["epoch"] - 1, SALT_EVAL))
    again = loop.evaluate(model, *prep.held, attack=cfg.eval_attack, batch_size=cfg.eval_batch_size, generator=gen)
    assert set(decode(prep.held[0])) == held
    assert again["pgd20_acc"] == records[best["epoch"] - 1]["pgd20_acc"]
    saved = rd.config_dict()
    assert (saved["val_n"], saved["best_selection"]) == (VAL_N, "validation")


def test_the_default_path_is_unchanged(data, tmp_path, monkeypatch):
    cfg = resolve(RunSettings(method="natural", data=str(data), epochs=1, **TINY))
    assert (cfg.val_n, cfg.best_selection) == (None, "test-subset")
    rec = Recorder(monkeypatch.setattr)
    engine.train(cfg, tmp_path / "run", progress=False)
    assert rec.trained == {("train", i) for i in range(N_TRAIN)}  # the whole training set
    [(images, _)] = rec.evaluated
    assert images == [("test", j) for j in range(cfg.eval_n)]  # the first eval_n test images, in order
    old = cfg.to_dict()
    for key in ("val_n", "best_selection"):  # a config.json written before the fields reads as it trained
        del old[key]
    assert (Config.from_dict(old).val_n, Config.from_dict(old).best_selection) == (None, "test-subset")


def test_a_self_trained_teacher_holds_out_the_same_images(data):
    settings = RunSettings(
        method="rslad", teacher_arch="tiny", preset="quick", val_n=VAL_N, data=str(data), train_n=64, **TINY
    )
    cfg = resolve(settings)
    assert (cfg.teacher_run["val_n"], cfg.teacher_run["best_selection"]) == (VAL_N, "validation")
    assert not any(n.startswith("--val-n") for n in engine.prepare(cfg).notes)  # its teacher held them out too


# ---- two processes ---------------------------------------------------------------------------------------


def _worker(argv) -> int:
    """torchrun's entry: record what each rank trains on and evaluates, then train.main(TRAIN_ARGS)."""
    import argparse

    from rslad_fast import train

    p = argparse.ArgumentParser()
    p.add_argument("--record", required=True)
    split = argv.index("--")
    opts, train_args = p.parse_args(argv[:split]), argv[split + 1 :]
    rec = Recorder(setattr)
    status = train.main(train_args)
    rec.dump(Path(opts.record) / f"rank{os.environ['RANK']}.json")
    return status


def test_two_processes_hold_out_the_same_images(data, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "run"
    args = ["--method", "natural", "--student", "tiny", "--device", "cpu", "--threads", "1", "--batch-size", "16"]
    args += ["--epochs", "2", "--val-n", str(VAL_N), "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--tensorboard"]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE)]
        + ["--record", str(record), "--", *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=HERE.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    held = _held_out()
    for doc in ranks:
        # each rank is handed every held-out image (and evaluates its slice of them), and never trains on one
        assert all({tuple(i) for i in images} == held for images, _ in doc["evaluated"])
        assert len(doc["evaluated"]) == 2
        assert not {tuple(i) for i in doc["trained"]} & held
    # the two shards together are the whole remaining training set
    assert {tuple(i) for doc in ranks for i in doc["trained"]} == {("train", i) for i in range(N_TRAIN)} - held
    # both ranks report the same figures, the ones rank 0 wrote
    records = RunDir(out).metrics_records()
    assert [ev["pgd20_acc"] for _, ev in ranks[1]["evaluated"]] == [r["pgd20_acc"] for r in records]
    # --tensorboard under torchrun: one writer, rank 0's
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ---- eval.json and the reproduce table name the selection -------------------------------------------------


def test_the_sweep_names_what_picked_best_pt(data, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--methods", "sat", "--students", "tiny", "--preset", "quick", "--no-progress"]
    argv += ["--epochs", "1", "--batch-size", "32", "--threads", "1", "--train-n", "64", "--eval-n", "12"]
    argv += ["--val-n", str(VAL_N), "--data", str(data)]
    argv += ["--attacks", "clean", "--n", "8", "--tensorboard"]
    assert reproduce.main(argv) == 0
    report = json.loads((out / "sat-tiny" / "eval.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["best"]["selection"]["name"] == "validation" and rows["best"]["selection"]["images"] == VAL_N
    assert "selection" not in rows["last"]
    eval_md = (out / "sat-tiny" / "eval.md").read_text()
    assert f"best picked by: validation, PGD-20 on {VAL_N} training images" in eval_md
    md = (out / "table2.md").read_text()
    assert "| checkpoint | best picked by |" in md
    assert f"| best | validation ({VAL_N}) |" in md and "| last | — |" in md
    table = json.loads((out / "table2.json").read_text())
    assert {r["checkpoint"]: (r["selection"] or {}).get("name") for r in table["rows"]} == {
        "best": "validation",
        "last": None,
    }
    # every run's events under --out: one log root for the sweep
    assert list((out / "sat-tiny" / "tensorboard").glob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {out}" in md


def test_eval_json_names_the_paper_s_selection_by_default(data, tmp_path):
    from rslad_fast.evaluation import report as eval_report
    from rslad_fast.evaluation.run import evaluate_run
    from rslad_fast.evaluation.settings import EvalSettings

    cfg = resolve(RunSettings(method="natural", data=str(data), epochs=1, **TINY))
    engine.train(cfg, tmp_path / "run", progress=False)
    report = evaluate_run(tmp_path / "run", EvalSettings(attacks=["clean"], n=8, no_progress=True, device="cpu"))
    eval_report.write(report)
    best = next(r for r in report["rows"] if r["label"] == "best")
    assert best["selection"] == validation.describe(cfg.to_dict())
    assert best["selection"]["name"] == "test-subset" and best["selection"]["images"] == cfg.eval_n
    assert "best picked by: test-subset" in (tmp_path / "run" / "eval.md").read_text()


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process

    exit_process(_worker(sys.argv[1:]))  # os._exit under torchrun: the gloo runloop race at finalization (dist.py)
