"""``python -m rslad_fast.reproduce``: the sweep end to end at test sizes, resumed after a kill, its refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rslad_fast import engine, reproduce
from rslad_fast.engine import runner
from rslad_fast.engine.preparation import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--students", "tiny", "--teacher-arch", "tiny", "--preset", "quick", "--no-progress"]
# train's flags, passed through: a tiny run of 2 epochs on 128 images
TRAIN = ["--train-n", "128", "--epochs", "2", "--eval-n", "32", "--batch-size", "64", "--threads", "1"]
EVAL = ["--attacks", "clean,fgsm,pgd20-sat", "--n", "32", "--eval-batch-size", "32"]


@pytest.fixture(scope="module")
def data(fake_cifar10):
    return fake_cifar10(n_train=256, n_test=64, seed=0)


def sweep(out, data, *extra, methods="sat,rslad"):
    return reproduce.main(["--out", str(out), "--methods", methods, *TINY, *EVAL, *TRAIN, "--data", str(data), *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("sweep") / "full"
    assert sweep(out, data) == 0
    return out


def test_sweep_end_to_end(finished, data):
    out = finished
    plan = json.loads((out / "plan.json").read_text())
    assert plan["runs"] == ["teacher", "sat-tiny", "rslad-tiny"]
    assert plan["train_flags"]["data"] == str(data.resolve())
    for name in plan["runs"]:
        assert (out / name / "last.pt").is_file()
    for name in ("sat-tiny", "rslad-tiny"):
        assert json.loads((out / name / "eval.json").read_text())["n"] == 32
    assert not (out / "teacher" / "eval.json").exists()  # the teacher is no row of the table
    for name in ("table2.md", "table2.csv", "table2.json", "curves-tiny.png"):
        assert (out / name).stat().st_size > 0
    # the distillation run learnt from the sweep's teacher, the file it trained
    rslad_cfg = json.loads((out / "rslad-tiny" / "config.json").read_text())
    assert rslad_cfg["teacher"]["source"] == "file"
    assert rslad_cfg["teacher"]["path"] == str((out / "teacher" / "last.pt").resolve())
    assert rslad_cfg["teacher"]["sha256"] == file_sha256(out / "teacher" / "last.pt")
    sat_cfg = json.loads((out / "sat-tiny" / "config.json").read_text())
    assert sat_cfg["teacher"] is None and sat_cfg["epochs"] == 2 and sat_cfg["train_n"] == 128
    # train's --data reached every run and evaluation (reproduce takes no abbreviation of its own flags)
    for name in plan["runs"]:
        assert json.loads((out / name / "config.json").read_text())["data"] == str(data.resolve())
    assert json.loads((out / "sat-tiny" / "eval.json").read_text())["config"]["data"] == str(data)


def test_table_holds_the_runs_eval_json_figures(finished):
    table = json.loads((finished / "table2.json").read_text())
    rows = {(r["method"], r["checkpoint"]): r for r in table["rows"]}
    assert set(rows) == {(m, c) for m in ("SAT", "RSLAD") for c in ("best", "last")}
    for method, run in (("SAT", "sat-tiny"), ("RSLAD", "rslad-tiny")):
        report = json.loads((finished / run / "eval.json").read_text())
        for r in report["rows"]:
            cols = rows[method, r["label"]]["columns"]
            assert {c: v["ours"] for c, v in cols.items()} == {
                c: r["accuracy"][c] for c in ("clean", "fgsm", "pgd20-sat")
            }
            assert rows[method, r["label"]]["n"] == 32
    csv_lines = (finished / "table2.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,method,checkpoint,n,clean_ours,clean_paper,clean_diff")
    assert len(csv_lines) == 5
    md = (finished / "table2.md").read_text()
    assert "| tiny | RSLAD | last |" in md and "Test images: 32" in md
    # fake data: not the official release, and the table says so
    assert table["data"]["official"] is False and "not the official cifar10 files" in md


def test_paper_figures_beside_ours():
    """The paper's figures and the difference, for a Table 2 row (last checkpoint only)."""
    assert reproduce.PAPER[("resnet18", "rslad")]["aa"] == 51.32
    assert reproduce.PAPER[("mnv2", "sat")]["pgd20-sat"] == 49.71
    cell = reproduce._cell({"ours": 50.0, "paper": 51.32, "diff": 50.0 - 51.32})
    assert cell == "50.00 (51.32, -1.32)"


def test_rerun_skips_everything(finished, data, capsys):
    mtimes = {p: p.stat().st_mtime_ns for p in finished.glob("*/last.pt")} | {
        p: p.stat().st_mtime_ns for p in finished.glob("*/eval.json")
    }
    capsys.readouterr()
    assert sweep(finished, data) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 5  # teacher, 2 runs, 2 evaluations
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_killed_sweep_resumes_to_the_same_table(tmp_path, finished, data, monkeypatch, capsys):
    out = tmp_path / "killed"
    real = runner._end_of_epoch

    def kill_after_first_rslad_epoch(r, epoch, *a, **k):
        result = real(r, epoch, *a, **k)
        if r.cfg.method == "rslad" and epoch == 0:
            raise KeyboardInterrupt  # as Ctrl-C right after epoch 1's last.pt
        return result

    monkeypatch.setattr(runner, "_end_of_epoch", kill_after_first_rslad_epoch)
    assert sweep(out, data, "--no-download") == 130
    assert reproduce.completed_epochs(out / "rslad-tiny") == (1, 2)
    assert not (out / "sat-tiny" / "eval.json").exists()
    monkeypatch.setattr(runner, "_end_of_epoch", real)
    done = {p: p.stat().st_mtime_ns for p in (out / "teacher" / "last.pt", out / "sat-tiny" / "last.pt")}
    capsys.readouterr()
    resumed = []
    real_resume = engine.resume
    monkeypatch.setattr(engine, "resume", lambda d, **k: resumed.append((str(d), k["download"])) or real_resume(d, **k))
    assert sweep(out, data, "--no-download") == 0
    assert resumed == [(str(out / "rslad-tiny"), False)]  # the flag kept: no download
    log = capsys.readouterr().out
    assert "train teacher: finished before, skipped" in log and "train sat-tiny: finished before, skipped" in log
    assert "resuming" in log and "already complete" not in log
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished runs not redone
    killed, full = (json.loads((d / "table2.json").read_text())["rows"] for d in (out, finished))
    assert [r["columns"] for r in killed] == [r["columns"] for r in full]
    for name in ("sat-tiny", "rslad-tiny"):
        a, b = (torch.load(d / name / "last.pt", weights_only=True)["model"] for d in (out, finished))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_evaluation_is_redone(tmp_path, finished, data):
    """An eval.json older than last.pt (or with other attacks) is not a finished evaluation."""
    plan = reproduce.make_plan(
        reproduce.build_parser().parse_args(
            ["--out", str(finished), "--methods", "sat,rslad", *TINY, *EVAL, *TRAIN, "--data", str(data)]
        )
    )
    assert reproduce.eval_done(plan, finished / "sat-tiny")
    last = finished / "sat-tiny" / "last.pt"
    ev = finished / "sat-tiny" / "eval.json"
    stat = ev.stat()
    os.utime(ev, ns=(stat.st_atime_ns, last.stat().st_mtime_ns - 10**9))
    try:
        assert not reproduce.eval_done(plan, finished / "sat-tiny")
    finally:
        os.utime(ev, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_different_plan_is_refused(finished, data, capsys):
    before = (finished / "plan.json").read_text()
    assert sweep(finished, data, methods="rslad") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds a different plan (methods" in err and len(err.splitlines()) == 1
    assert sweep(finished, data, "--seed", "1") == 2
    assert "different plan (train_flags" in capsys.readouterr().err
    assert (finished / "plan.json").read_text() == before


def test_dry_run_prints_plan_and_estimate_and_writes_nothing(tmp_path, data, capsys):
    out = tmp_path / "dry"
    assert sweep(out, data, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "teacher" in printed and "train rslad tiny: 2 epochs x 2 batches of 64" in printed
    assert "3 training runs (8 epochs), 2 evaluations; remaining work: about" in printed


def test_dry_run_of_a_finished_sweep_costs_nothing(finished, data, capsys):
    assert sweep(finished, data, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert printed.count("[finished]") == 5 and "remaining work: none, every stage is finished" in printed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--methods", "sat,bogus"], "unknown method 'bogus'"),
        (["--students", "tiny,resnet99"], "unknown student 'resnet99'"),
        (["--method", "sat"], "--method: set by reproduce"),
        (["--methods", "sat", "--beta", "6"], "--beta: a hyperparameter of none of the methods sat"),
        (["--methods", "sat", "--teacher-cache", "on"], "--teacher-cache: no distillation method"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ],
)
def test_bad_input_one_line(tmp_path, data, capsys, argv, words):
    out = tmp_path / "bad"
    base = ["--out", str(out), "--students", "tiny", "--no-progress", "--data", str(data)]
    try:
        rc = reproduce.main(base + argv)
    except SystemExit as e:  # argparse's own errors (the one-line Parser)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_teacher_that_does_not_fit(tmp_path, data, capsys, natural_teacher):
    teacher = natural_teacher(data, "--student", "tiny", "--epochs", "1", "--threads", "1", "--no-progress")
    out = tmp_path / "t"
    argv = ["--out", str(out), "--students", "tiny", "--methods", "rslad", "--teacher", str(teacher)]
    assert reproduce.main(argv + ["--teacher-arch", "resnet8", "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "resnet8" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert reproduce.main(argv[:-2] + ["--teacher", str(tmp_path / "missing.pt"), "--data", str(data)]) == 2
    assert "no such file" in capsys.readouterr().err
    # the right architecture: the plan names the file by its content, so that another file is another plan
    plan = reproduce.make_plan(
        reproduce.build_parser().parse_args(argv + ["--teacher-arch", "tiny", "--data", str(data)])
    )
    assert plan.settings["teacher"] == {
        "file": str(teacher),
        "arch": "tiny",
        "sha256": file_sha256(teacher),
    }
    assert [s.name for s in plan.stages] == ["rslad-tiny", "rslad-tiny"]  # no teacher stage: train, evaluate


def test_unwritable_out(tmp_path, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert sweep(blocker / "sweep", data) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "file" in err and len(err.splitlines()) == 1, err
    notdir = tmp_path / "notdir"
    notdir.write_text("x")
    assert sweep(notdir, data) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_folder_that_is_no_sweep_is_refused(tmp_path, data, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert sweep(out, data) == 2
    assert "not empty and holds no plan.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_under_torchrun_every_run_and_evaluation_is_distributed(tmp_path, data):
    """``torchrun --nproc_per_node=2 -m rslad_fast.reproduce``: the teacher, the runs and the evaluations on 2
    gloo processes, rank 0 alone writing and printing."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = ["--out", str(out), "--methods", "natural,rslad", *TINY, "--attacks", "clean,fgsm", "--n-images", "16"]
    argv += ["--eval-batch-size", "8", "--train-n", "64", "--epochs", "1", "--batch-size", "16", "--eval-n", "16"]
    argv += ["--threads", "1", "--device", "cpu", "--data", str(data)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(
        [*torchrun, "-m", "rslad_fast.reproduce", *argv],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("[reproduce] all done") == 1 and res.stdout.count("| tiny | RSLAD | last |") == 1
    for name in ("teacher", "natural-tiny", "rslad-tiny"):
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert records and all(r["world_size"] == 2 for r in records), name
    for name in ("natural-tiny", "rslad-tiny"):
        assert json.loads((out / name / "eval.json").read_text())["world_size"] == 2
    assert json.loads((out / "table2.json").read_text())["rows"][0]["n"] == 16


def test_cifar100_sweep_has_no_cifar10_paper_figures(tmp_path, fake_cifar100, capsys):
    """--dataset cifar100 reaches every run and evaluation; the paper's (CIFAR-10) figures stay out."""
    data = fake_cifar100(n_train=128, n_test=32, seed=0)
    out = tmp_path / "c100"
    argv = ["--out", str(out), "--methods", "natural", "--students", "tiny", "--preset", "quick", "--no-progress"]
    argv += ["--attacks", "clean,fgsm", "--n", "32", "--dataset", "cifar100", "--train-n", "128", "--epochs", "1"]
    assert reproduce.main(argv + ["--eval-n", "32", "--threads", "1", "--data", str(data)]) == 0
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run "))  # train's
    assert "device cpu, 1 threads, fp32" in start and start.endswith(", cifar100"), start
    assert json.loads((out / "natural-tiny" / "config.json").read_text())["dataset"] == "cifar100"
    table = json.loads((out / "table2.json").read_text())
    assert table["data"]["dataset"] == "cifar100" and table["data"]["official"] is False
    assert all(c["paper"] is None for r in table["rows"] for c in r["columns"].values())
    assert "(cifar100, quick preset)" in (out / "table2.md").read_text()


def test_an_evaluation_made_by_hand_with_other_settings_is_redone(tmp_path, finished, data):
    """An eval.json of the same attacks and images but another eps is not the planned evaluation."""
    import shutil

    from rslad_fast import evaluate

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    args = ["--run", str(out / "sat-tiny"), "--attacks", "clean,fgsm,pgd20-sat", "--n", "32", "--data", str(data)]
    assert evaluate.main([*args, "--no-progress", "--eps", "1.0"]) == 0
    assert sweep(out, data) == 0  # redoes that evaluation, skips everything else
    redone = json.loads((out / "sat-tiny" / "eval.json").read_text())
    assert redone["config"]["eps"] == pytest.approx(8 / 255)
    assert json.loads((out / "table2.json").read_text())["rows"] == [
        {**r, "run": r["run"].replace(str(finished), str(out))}
        for r in json.loads((finished / "table2.json").read_text())["rows"]
    ]


def test_eval_batch_size_is_no_part_of_the_plan(finished, data, capsys):
    """Memory only: an evaluation that ran out of it can be retried smaller in the same folder."""
    assert sweep(finished, data, "--eval-batch-size", "16") == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 5


def test_a_plan_nothing_of_which_started_is_replaced(tmp_path, data):
    def plan_of(methods):
        argv = ["--out", str(tmp_path / "p"), "--methods", methods, "--students", "tiny", *EVAL]
        return reproduce.make_plan(reproduce.build_parser().parse_args(argv + [*TRAIN, "--data", str(data)]))

    first = plan_of("sat")
    reproduce.write_plan(first)
    assert reproduce.check_plan_file(plan_of("sat")) is True  # the same plan: continue it
    assert reproduce.check_plan_file(plan_of("natural")) is False  # nothing ran: replaced
    (tmp_path / "p" / "sat-tiny").mkdir()
    (tmp_path / "p" / "sat-tiny" / "config.json").write_text("{}")  # a run began
    with pytest.raises(reproduce.UserError, match="holds a different plan"):
        reproduce.check_plan_file(plan_of("natural"))


def test_too_many_test_images_is_refused_before_any_training(tmp_path, data, capsys):
    out = tmp_path / "n"
    assert sweep(out, data, "--n", "65") == 2  # the generated test set holds 64
    err = capsys.readouterr().err.strip()
    assert err == f"error: --n 65 exceeds the 64 test images in {data.resolve()}" and not out.exists()


def test_a_dry_run_never_downloads(tmp_path, capsys):
    assert sweep(tmp_path / "d", tmp_path / "no-data", "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CIFAR-10 not found") and "download disabled" in err, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "no-data").exists()


# ---- issue 22: what a user's disk and hands can do to a sweep -------------------------------------------


def copy_of(finished, tmp_path, name="copy"):
    """A copy of the finished sweep (mtimes kept: its evaluations stay newer than their last.pt)."""
    import shutil

    out = tmp_path / name
    shutil.copytree(finished, out)
    return out


def rows_of(out):
    """table2.json's rows without the run paths, which name the sweep's folder."""
    return [{k: v for k, v in r.items() if k != "run"} for r in json.loads((out / "table2.json").read_text())["rows"]]


def one_error_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_torn_metrics_line_still_draws_the_curves(tmp_path, finished, data, capsys):
    """Item 1: a torn line (and a record without values) in a run's metrics.jsonl is skipped by the one
    reader of metrics, never a JSONDecodeError / KeyError at the end of the sweep."""
    out = copy_of(finished, tmp_path)
    with open(out / "sat-tiny" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3}\ngarbage{\n')
    (out / "curves-tiny.png").unlink()
    assert sweep(out, data) == 0
    assert "finished before, skipped" in capsys.readouterr().out
    assert (out / "curves-tiny.png").stat().st_size > 0 and rows_of(out) == rows_of(finished)


def test_missing_metrics_draws_the_curves_without_that_run(tmp_path, finished, data, capsys):
    """Item 2: a run without metrics.jsonl is named and left out of its curves; the table is whole."""
    out = copy_of(finished, tmp_path)
    (out / "sat-tiny" / "metrics.jsonl").unlink()
    assert sweep(out, data) == 0
    log = capsys.readouterr().out
    assert f"note: {out / 'sat-tiny' / 'metrics.jsonl'}: missing; curves-tiny.png drawn without sat-tiny" in log
    assert (out / "curves-tiny.png").stat().st_size > 0 and rows_of(out) == rows_of(finished)


def test_a_result_that_cannot_be_written_is_named_with_what_was_written(tmp_path, finished, data, capsys):
    """Item 2: a failed write of the results names the file and says which of them were written."""
    out = copy_of(finished, tmp_path)
    (out / "curves-tiny.png").unlink()
    (out / "curves-tiny.png").mkdir()  # a folder where the figure goes: its write fails
    assert sweep(out, data) == 2
    err = one_error_line(capsys.readouterr().err)
    assert str(out / "curves-tiny.png") in err
    assert "written: table2.md, table2.csv, table2.json; once that is fixed, rerun the same command" in err


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "a list", "deleted"])
def test_a_damaged_plan_is_rebuilt_from_the_command(tmp_path, finished, data, capsys, damage):
    """Item 3: plan.json gone or damaged while the runs are intact: the command's plan, checked against the
    runs' config.json files, replaces it; nothing is redone."""
    out = copy_of(finished, tmp_path)
    plan = out / "plan.json"
    text = plan.read_text()
    if damage == "deleted":
        plan.unlink()
    else:
        plan.write_bytes({"truncated": text[: len(text) // 2].encode(), "random bytes": bytes(range(256)) * 3,
                          "a list": b"[1,2]"}[damage])  # fmt: skip
    assert sweep(out, data) == 0
    log = capsys.readouterr().out
    assert f"note: {plan} was " in log and "rebuilt from this command, which agrees with the config.json of 3" in log
    assert log.count("finished before, skipped") == 5  # teacher, 2 runs, 2 evaluations
    assert plan.read_text() == text and rows_of(out) == rows_of(finished)


@pytest.mark.parametrize(
    "extra, methods, words",
    [
        (["--seed", "1"], "sat,rslad", "config.json says seed 0, this command 1"),
        ([], "rslad", "sat-tiny/config.json: a run of no stage of this command"),
    ],
)
def test_a_lost_plan_with_other_settings_is_refused(tmp_path, finished, data, capsys, extra, methods, words):
    """Item 3: without plan.json, a real difference from the runs' config.json is refused, naming it."""
    out = copy_of(finished, tmp_path)
    (out / "plan.json").unlink()
    assert sweep(out, data, *extra, methods=methods) == 2
    err = one_error_line(capsys.readouterr().err)
    assert words in err and "rerun with" in err, err
    assert not (out / "plan.json").exists()


def test_an_evaluation_in_use_by_another_process_is_refused(tmp_path, finished, data, capsys):
    """Item 4: the evaluation stage takes the run's lock, as training does: a second sweep on the same
    --out stops with one line instead of evaluating the same run and racing to write eval.json."""
    import subprocess
    import sys

    out = copy_of(finished, tmp_path)
    (out / "sat-tiny" / "eval.json").unlink()
    hold = "import fcntl,os,sys; f=open(sys.argv[1],'w'); fcntl.flock(f,fcntl.LOCK_EX); f.write(str(os.getpid()));"
    hold += "f.flush(); print('held',flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out / "sat-tiny" / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        assert sweep(out, data) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"{out / 'sat-tiny'} is in use by another process (pid {holder.pid})" in err
        assert not (out / "sat-tiny" / "eval.json").exists()
    finally:
        holder.communicate(b"")  # end of its stdin: it exits, the kernel drops its lock
    assert sweep(out, data) == 0 and rows_of(out) == rows_of(finished)


def test_a_deleted_teacher_is_not_retrained_when_no_run_needs_it(tmp_path, finished, data, capsys):
    """Item 6: every distillation run finished and evaluated: a deleted teacher/ is not trained again."""
    import shutil

    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "teacher")
    assert sweep(out, data, "--dry-run") == 0
    assert "[not needed: every distillation run is finished]" in capsys.readouterr().out
    assert sweep(out, data) == 0
    assert "train teacher: not needed, every distillation run is finished; skipped" in capsys.readouterr().out
    assert not (out / "teacher").exists() and rows_of(out) == rows_of(finished)


def test_sigterm_in_a_sweep_gives_only_the_sweeps_advice(tmp_path, data, monkeypatch, capsys):
    """Item 5: SIGTERM while a run trains: the sweep's one continuation, never train's --resume advice."""
    import signal

    real = runner._end_of_epoch

    def terminate(r, epoch, *a, **k):
        result = real(r, epoch, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` right after epoch 1's last.pt
        return result

    monkeypatch.setattr(runner, "_end_of_epoch", terminate)
    argv = ["--out", str(tmp_path / "t"), "--methods", "sat", "--students", "tiny", "--preset", "quick", *EVAL]
    assert reproduce.main([*argv, *TRAIN, "--no-progress", "--data", str(data)]) == 128 + signal.SIGTERM
    cap = capsys.readouterr()
    both = cap.out + cap.err
    assert "rslad_fast.train" not in both and both.count("rerun the same command") == 1, both
    assert cap.err.strip().endswith("terminated (SIGTERM); rerun the same command to continue")


def test_cifar100_sweep_with_the_fp16_teacher_cache_equals_the_uncached_one(
    tmp_path, fake_cifar100, natural_teacher, monkeypatch, capsys
):
    """Item 8: ``--dataset cifar100`` end to end with the teacher-logit cache over an fp16 teacher, against the
    same sweep uncached, which ``--teacher-cache auto`` chooses when the cache does not fit (memory made
    small here), saying so. (At this size an image's view rarely repeats, so the cache's misses, the
    teacher's forwards it stores, are what is compared; the hit path has its own tests.)"""
    from rslad_fast.engine import teacher_cache

    data = fake_cifar100(n_train=64, n_test=16, seed=0)
    small = ["--train-n", "64", "--epochs", "2", "--eval-n", "16", "--batch-size", "32", "--threads", "1"]
    teacher = natural_teacher(data, "--dataset", "cifar100", "--student", "tiny", "--preset", "quick", *small)
    argv = ["--methods", "rslad", "--students", "tiny", "--teacher", str(teacher), "--teacher-arch", "tiny"]
    argv += ["--preset", "quick", "--no-progress", "--attacks", "clean,fgsm", "--n", "16", "--dataset", "cifar100"]
    argv += [*small, "--teacher-dtype", "fp16", "--data", str(data)]
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    assert reproduce.main(["--out", str(cached), *argv, "--teacher-cache", "on"]) == 0
    assert "teacher-logit cache: " in capsys.readouterr().out  # its size, said when it is used
    monkeypatch.setattr(teacher_cache, "free_bytes", lambda device: 1 << 20)  # 1 MiB free: it does not fit
    assert reproduce.main(["--out", str(uncached), *argv, "--teacher-cache", "auto"]) == 0
    log = capsys.readouterr().out
    note = "note: the teacher-logit cache needs "
    assert note in log and "): training without it (--teacher-cache auto)" in log.split(note)[1].splitlines()[0], log
    runs = [json.loads((d / "rslad-tiny" / "metrics.jsonl").read_text().splitlines()[-1]) for d in (cached, uncached)]
    assert "teacher_cache_hit_rate" in runs[0] and "teacher_cache_hit_rate" not in runs[1]
    a, b = (torch.load(d / "rslad-tiny" / "last.pt", weights_only=True)["model"] for d in (cached, uncached))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows_of(cached) == rows_of(uncached)
    table = json.loads((cached / "table2.json").read_text())
    assert table["data"]["dataset"] == "cifar100" and all(
        c["paper"] is None for r in table["rows"] for c in r["columns"].values()
    )


def test_the_official_md5_copy_is_torchvisions():
    """table.OFFICIAL_MD5 is torchvision's record of the official CIFAR files, copied (its import is slow)."""
    from torchvision import datasets

    from rslad_fast.reproduce.table import OFFICIAL_MD5

    for name, cls in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        folder, files = OFFICIAL_MD5[name]
        assert folder == cls.base_folder and [list(f) for f in files] == cls.train_list + cls.test_list
