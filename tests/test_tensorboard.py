"""``--tensorboard`` (engine/tb_log.py): the event files under RUN_DIR/tensorboard, read back with TensorBoard's own
reader, hold metrics.jsonl's per-epoch scalars (the same numbers, one event per epoch and tag) and the config,
also after resumes, one of them redoing an epoch whose events were already written; the package missing is one
UserError before anything is written. (Rank 0 alone writing under torchrun, and a sweep's runs under one log
root: tests/test_val_n.py's two-process run and sweep.)"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rslad_fast import engine
from rslad_fast.engine import RunDir, RunSettings, resolve, tb_log
from rslad_fast.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(student="tiny", device="cpu", threads=1, train_n=64, eval_n=16, batch_size=32)


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=64, n_test=16, seed=1)


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _check_events_equal_metrics(run_dir) -> None:
    rd = RunDir(run_dir)
    records = rd.metrics_records()
    acc = _events(run_dir)
    expected = {}  # tag -> [(step, value)] from metrics.jsonl
    for r in records:
        for tag, value in tb_log.scalars(r).items():
            expected.setdefault(tag, []).append((r["epoch"], value))
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert {"train/train_loss", "eval/clean_acc", "eval/pgd20_acc", "optim/lr", "speed/images_per_s"} <= set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        # one event per epoch (no duplicate step), each the metrics line's number (TensorBoard keeps float32)
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == [float(np.float32(v)) for _, v in points], tag
    [text] = acc.Tensors(f"{tb_log.CONFIG_TAG}/text_summary")
    assert text.step == 0
    body = text.tensor_proto.string_val[0].decode()
    assert json.loads(body.removeprefix("```json\n").removesuffix("\n```")) == rd.config_dict()


def test_events_equal_metrics_across_resumes(data, tmp_path):
    cfg = resolve(RunSettings(method="natural", data=str(data), epochs=3, tensorboard=True, **TINY))
    out = tmp_path / "run"
    engine.create_run_dir(out, cfg)
    engine.run(engine.prepare(cfg), out, progress=False, stop_after=1)  # as if killed after epoch 1
    _check_events_equal_metrics(out)
    rd = RunDir(out)
    shutil.copy(rd.last, tmp_path / "epoch1.pt")
    engine.run(engine.prepare(rd.read_config()), out, progress=False, stop_after=2)
    stale = {e.step: e.value for e in _events(out).Scalars("speed/epoch_time_s")}
    _check_events_equal_metrics(out)
    # a kill after epoch 2's events but before its last.pt: the resume redoes epoch 2 (its metrics line too)
    shutil.copy(tmp_path / "epoch1.pt", rd.last)
    engine.resume(out, progress=False)
    assert [r["epoch"] for r in rd.metrics_records()] == [1, 2, 3]
    _check_events_equal_metrics(out)  # epoch 2 once, the redone epoch's figures
    redone = {e.step: e.value for e in _events(out).Scalars("speed/epoch_time_s")}
    assert redone[1] == stale[1] and redone[2] != stale[2]  # the timing of the epoch trained twice differs
    assert len(list(rd.tensorboard.glob("events.out.tfevents.*"))) == 3  # one file per session, appended


def test_off_by_default_and_for_older_runs(data, tmp_path):
    cfg = resolve(RunSettings(method="natural", data=str(data), epochs=1, **TINY))
    assert cfg.tensorboard is False
    engine.train(cfg, tmp_path / "run", progress=False)
    assert not RunDir(tmp_path / "run").tensorboard.exists()
    old = cfg.to_dict()
    del old["tensorboard"]  # a config.json written before the field
    assert engine.Config.from_dict(old).tensorboard is False


def test_missing_package_is_one_user_error_before_any_write(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import of it raises ImportError
    cfg = resolve(RunSettings(method="natural", data=str(data), epochs=1, tensorboard=True, **TINY))
    with pytest.raises(UserError, match=r"--tensorboard needs the tensorboard package.*rslad_fast\[tensorboard\]"):
        engine.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_tags_group_the_metrics_keys():
    record = {"epoch": 4, "lr": 0.1, "train_loss": 1.0, "pgd20_acc": 0.5, "images_per_s": 9.0, "best": True}
    record |= {"teacher_cache_hit_rate": 0.9, "world_size": 2}
    assert tb_log.scalars(record) == {
        "optim/lr": 0.1,
        "train/train_loss": 1.0,
        "eval/pgd20_acc": 0.5,
        "speed/images_per_s": 9.0,
        "teacher_cache/teacher_cache_hit_rate": 0.9,
        "run/world_size": 2.0,
    }
