"""The sweep's own kill test (issue 22): a tiny sweep killed with SIGKILL at random moments (a fixed seed draws
them), some of them while table2.* and the curves are written, rerun each time, ends in files byte-identical to
the uninterrupted sweep's; and a SIGTERM to the sweep's process group gives the sweep's one continuation.

How the tables are compared: table2.md and table2.json name the runs by their absolute paths, so both sweeps run
in the same folder: the uninterrupted one first, its files kept in memory, the folder deleted, then the killed
ones. Every byte of table2.md, table2.csv, table2.json and curves-tiny.png is compared, paths included.

The seed fixes the moments (seconds after a line of the sweep's output); which step of the sweep each lands in
still depends on the machine's speed, and the test holds wherever they land.

Each try is a process of its own (a SIGKILL must hit a real process), so each pays Python's and torch's start:
the sweep is as small as a sweep that resumes gets (SAT on the tiny student, 2 epochs of 4 batches of 16 images,
clean and FGSM on 16 images).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow  # about a dozen processes, each paying torch's import

SEED = 22  # draws the kill moments
KILLS = 7  # SIGKILLs at random moments of a run
TABLE_KILLS = 3  # SIGKILLs while the results are written
RESULTS = ("table2.md", "table2.csv", "table2.json", "curves-tiny.png")


def last_stage_over(line: str) -> bool:
    """The line that ends the last stage: what follows is the writing of the results, then "all done"."""
    return line.startswith("[reproduce] 2/2 evaluate sat-tiny: ") and ("done in" in line or "skipped" in line)


def starts(prefix: str):
    return lambda line: line.startswith(prefix)


def command(out, data) -> list:
    argv = ["--out", str(out), "--methods", "sat", "--students", "tiny", "--preset", "quick", "--no-progress"]
    argv += ["--attacks", "clean,fgsm", "--n", "16", "--eval-batch-size", "16", "--train-n", "64", "--epochs", "2"]
    argv += ["--eval-n", "16", "--batch-size", "16", "--threads", "1", "--device", "cpu", "--data", str(data)]
    return [sys.executable, "-m", "rslad_fast.reproduce", *argv]


class Sweep:
    """One process of the sweep in a session of its own (so that a signal reaches all of it, as a terminal's
    or a service manager's does), its stdout lines timed as they come."""

    def __init__(self, cmd, err_path):
        self.t0 = time.monotonic()
        self.err_path = err_path
        with open(err_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                start_new_session=True,
            )
        self.lines = []  # (seconds since the start, line)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line))

    def wait_for(self, predicate, timeout: float = 300) -> bool:
        """Until a line for which ``predicate`` holds came (True) or the process ended without one (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(predicate(line) for _, line in list(self.lines)):
                return True
            if self.proc.poll() is not None:
                self.reader.join()
                return any(predicate(line) for _, line in self.lines)
            time.sleep(0.005)
        raise AssertionError(f"no such line in {timeout} s: {''.join(line for _, line in self.lines)}")

    def sleep_or_end(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.proc.poll() is None:
            time.sleep(0.005)

    def signal(self, sig) -> bool:
        """Send ``sig`` to the process group; False when the sweep had already ended."""
        if self.proc.poll() is not None:
            return False
        os.killpg(self.proc.pid, sig)
        return True

    def finish(self, timeout: float = 300) -> tuple:
        rc = self.proc.wait(timeout)
        self.reader.join()
        with open(self.err_path) as f:
            err = f.read()
        return rc, "".join(line for _, line in self.lines), err

    def when(self, predicate) -> float:
        return next(t for t, line in self.lines if predicate(line))


def test_sweep_killed_at_random_moments_reruns_to_the_same_files(tmp_path, fake_cifar10):
    data = fake_cifar10(n_train=64, n_test=16, seed=0)
    out = tmp_path / "sweep"
    cmd = command(out, data)

    ref = Sweep(cmd, tmp_path / "err")
    rc, log, err = ref.finish()
    assert rc == 0, log + err
    work_starts = ref.when(starts("[reproduce] 2 stages;"))  # the plan is checked and written before it
    work = ref.lines[-1][0] - work_starts  # training, evaluation, the results
    # the results' write (matplotlib's import included)
    writing = ref.when(starts("[reproduce] all done")) - ref.when(last_stage_over)
    expected = {name: (out / name).read_bytes() for name in RESULTS}
    shutil.rmtree(out)

    # SIGTERM once the run has begun (its first epoch's last.pt written; item 5): the sweep's own advice alone,
    # never train's "continue with: python -m rslad_fast.train --resume"
    s = Sweep(cmd, tmp_path / "err")
    assert s.wait_for(starts("[sat/tiny] epoch 1/2"))
    assert s.signal(signal.SIGTERM)
    rc, log, err = s.finish()
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, log + err
    assert "rslad_fast.train" not in log + err and (log + err).count("rerun the same command") == 1, log + err

    def same_files(when: str) -> None:
        for name in RESULTS:
            assert (out / name).read_bytes() == expected[name], (name, when, history)

    # Each round starts from an empty folder and kills its sweep until every stage is done (or a rerun ends by
    # itself); a rerun then writes the results, they are compared and the next round begins, so that the kills
    # keep landing in the work, not only in a finished sweep's rewrite of its table.
    rng = random.Random(SEED)
    tries = ["random"] * KILLS + ["table"] * TABLE_KILLS
    rng.shuffle(tries)
    wanted = {"random": KILLS, "table": TABLE_KILLS}
    landed = {"random": 0, "table": 0}
    history = []  # (kind, the last line the killed sweep printed): where the kills landed
    rounds = 0

    def next_round(log: str) -> None:
        nonlocal rounds
        if not any(last_stage_over(line) for line in log.splitlines()):
            return  # work left: the round goes on
        if "[reproduce] all done" not in log:
            rc, log, err = Sweep(cmd, tmp_path / "err").finish()
            assert rc == 0, log + err
        same_files(f"round {rounds}")
        shutil.rmtree(out)
        rounds += 1

    for kind in tries * 3:  # a try whose sweep ended before its moment is made again later
        if landed == wanted:
            break
        if landed[kind] >= wanted[kind]:
            continue
        s = Sweep(cmd, tmp_path / "err")
        if kind == "table":  # while the results are written
            if s.wait_for(last_stage_over):
                s.sleep_or_end(rng.uniform(0, writing))
        elif rng.random() < 0.25:  # while the plan is checked and written, torch imported
            s.sleep_or_end(rng.uniform(0, work_starts))
        elif s.wait_for(starts("[reproduce] 2 stages;")):  # while it trains, evaluates, writes the results
            s.sleep_or_end(rng.uniform(0, work))
        killed = s.signal(signal.SIGKILL)
        rc, log, err = s.finish()
        if not killed:  # it ended first: whole, and the round is over
            assert rc == 0, log + err
            next_round(log)
            continue
        assert rc == -signal.SIGKILL, log + err
        history.append((kind, log.splitlines()[-1] if log else "(nothing printed yet)"))
        if kind == "random" or "[reproduce] all done" not in log:
            landed[kind] += 1
        for name in RESULTS:  # a result is there whole (replaced atomically) or not at all
            if (out / name).exists():
                assert (out / name).read_bytes() == expected[name], (name, kind, history)
        next_round(log)
    assert landed == wanted, (landed, history)
    print(f"{rounds} rounds; " + "\n".join(f"killed ({kind}) after: {line}" for kind, line in history))  # -s

    rc, log, err = Sweep(cmd, tmp_path / "err").finish()
    assert rc == 0, log + err
    same_files("the last round")
