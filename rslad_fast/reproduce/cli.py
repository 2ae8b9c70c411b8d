"""The paper's Table 2 and training curves from one resumable command: ``python -m rslad_fast.reproduce``.

    # what it would do and what it would cost on this machine; changes nothing
    python -m rslad_fast.reproduce --out sweeps/quick --preset quick --dry-run

    # a CPU-sized sweep: RSLAD and SAT, MobileNetV2, the quick preset's self-trained teacher, 500 test images
    python -m rslad_fast.reproduce --out sweeps/quick --preset quick --students mnv2 --methods sat,rslad --n 500

    # the paper (a GPU machine): every method, both students, TRADES' WRN-34-10 as the teacher, 10,000 images
    python -m rslad_fast.reproduce --out sweeps/paper --teacher model_cifar_wrn.pt --teacher-arch wrn34-10

    # killed at any moment: the same command again skips what is finished and resumes the rest
    python -m rslad_fast.reproduce --out sweeps/paper --teacher model_cifar_wrn.pt --teacher-arch wrn34-10

The sweep is a list of stages, each a typed engine call in this process (``engine.train`` / ``resume`` with a
Config, ``evaluation.evaluate_run`` with EvalSettings):

1. without ``--teacher`` and with a distillation method in the sweep, ``DIR/teacher``: the teacher that
   ``train`` would train for itself (TRADES on the preset's teacher architecture, the preset's teacher size),
   trained once and used by every distillation run (``--teacher DIR/teacher/last.pt``);
2. per (student, method): ``DIR/<method>-<student>``, the run ``python -m rslad_fast.train --method M
   --student S --preset P --out DIR/<method>-<student>`` plus every other flag given here that applies to it
   (a method hyperparameter goes to the methods that have it; a flag no run takes is an error);
3. per run: ``python -m rslad_fast.evaluate --run DIR/<method>-<student>`` (best.pt and last.pt) with
   ``--attacks``, ``--n`` and ``--eval-batch-size``;
4. ``table2.md``, ``table2.csv``, ``table2.json`` (the paper's figures beside ours) and ``curves-<student>.png``
   (every method's clean and PGD-20 accuracy and loss per epoch, as the paper's Figs. 2 and 3).

``DIR/plan.json`` holds the sweep's settings, written before anything starts; a rerun with other settings
is refused (use another --out); one that is gone or damaged is rebuilt from the command once every run
folder's config.json agrees with it. Every stage holds its run directory's lock (``RunLock``): a second sweep
on the same --out stops with one line instead of doing the same work. The self-trained teacher is trained
only while a distillation run has epochs left to train. A stage is finished when its files say so (a run's
``last.pt`` at its last epoch; an ``eval.json`` newer than it with the planned attacks and n): a rerun skips
those, resumes a killed run from its ``last.pt`` and redoes an interrupted evaluation. Under torchrun every
run and every evaluation is distributed as ``train`` and ``evaluate`` are, and rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rslad_fast import engine, methods
from rslad_fast.cli import Parser, attack_list, integer, print_error, sigterm_as_interrupt, stop_status, torchrun_main
from rslad_fast.engine.checkpoint import WriteError
from rslad_fast.engine.dist import Agreed, agreed
from rslad_fast.engine.estimate import fmt_duration
from rslad_fast.engine.rundir import RunLock
from rslad_fast.errors import UserError
from rslad_fast.evaluation import report as eval_report
from rslad_fast.evaluation.robustness import ATTACKS
from rslad_fast.evaluation.run import evaluate_run
from rslad_fast.evaluation.settings import DefaultN
from rslad_fast.models import ARCHS, canonical_name
from rslad_fast.run_flags import add_run_flags

from .dry_run import estimate_stages, print_plan
from .plan import (
    Plan,
    check_plan_file,
    eval_done,
    make_plan,
    teacher_idle,
    train_state,
    write_plan,
)
from .table import collect, dataset_of, provenance, write_curves, write_table

DEFAULT_STUDENTS = ("resnet18", "mnv2")  # the paper's two students (Table 2)
DEFAULT_METHODS = ("natural", "sat", "trades", "ard", "iad", "rslad")  # Table 2's rows (MART: --methods)


def _names(kind: str, known, canon=lambda s: s):
    def parse(text: str) -> list:
        names, seen = [], set()
        for raw in text.split(","):
            raw = raw.strip()
            if not raw:
                continue
            try:
                name = canon(raw)
            except UserError:
                name = None
            if name not in known:
                raise argparse.ArgumentTypeError(f"unknown {kind} {raw!r}; choose from {','.join(known)}")
            if name not in seen:
                seen.add(name)
                names.append(name)
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} given")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rslad_fast.reproduce",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n" + __doc__.split("\n\n", 1)[1].split("\n\nThe sweep")[0] + "\n\nThe run settings "
        "(--data, --device, --seed, --epochs, --amp, a method's hyperparameter, ...) are train's and go to every "
        "run they apply to.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # no abbreviations: "--data" must not be taken for --data-provenance
        allow_abbrev=False,
    )
    p.add_argument("--out", metavar="DIR", required=True, help="the sweep's folder: plan, runs, table, curves")
    p.add_argument(
        "--students",
        type=_names("student", ARCHS, canonical_name),
        default=list(DEFAULT_STUDENTS),
        help=f"comma-separated architectures (default {','.join(DEFAULT_STUDENTS)}; any of {', '.join(ARCHS)})",
    )
    p.add_argument(
        "--methods",
        type=_names("method", methods.names()),
        default=list(DEFAULT_METHODS),
        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}: Table 2's rows; any of "
        f"{', '.join(methods.names())})",
    )
    p.add_argument(
        "--teacher",
        metavar="FILE",
        help="the teacher of every distillation run (default: one teacher trained first, in DIR/teacher, "
        "as train trains its own)",
    )
    p.add_argument("--teacher-arch", help="the teacher's architecture (default: train's)")
    p.add_argument("--preset", choices=("paper", "quick"), default="paper", help="train's preset (default paper)")
    p.add_argument(
        "--attacks",
        type=attack_list,
        default=list(ATTACKS),
        help=f"evaluation attacks, comma-separated subset of {','.join(ATTACKS)} (default: all six)",
    )
    p.add_argument(
        "--n",
        type=integer(1),
        default=DefaultN(10000),
        help="test images per evaluation, the first N (default: the whole test set; under torchrun: --n-images)",
    )
    # under torchrun, whose own parser takes --n for an abbreviation of its --nnodes/--nproc-per-node (as evaluate)
    p.add_argument("--n-images", dest="n", type=integer(1), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--eval-batch-size", type=integer(1), default=250, help="evaluate's --batch-size (default 250)")
    p.add_argument(
        "--data-provenance",
        metavar="TEXT",
        help="where the data set comes from, for the table (default: the files' checksums against the "
        "official release say whether it is the official one)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated cost; change nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-download", action="store_true", help="never try to download the data set")
    # train's own options that a sweep sets per run: refused with one line (make_plan)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)
    add_run_flags(p, skip=("teacher", "teacher_arch", "preset"))  # reproduce has its own of these three
    return p


# ---- The sweep ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    with sigterm_as_interrupt():
        return torchrun_main(lambda dist: _main(opts, dist))


def _main(opts, dist) -> int:
    try:
        plan = agreed(dist, lambda: make_plan(opts))
        if opts.dry_run:
            if dist.is_main:
                check_plan_file(plan)
                for note in plan.notes:
                    print(f"note: {note}")
                print_plan(plan, estimate_stages(plan))
            return 0
        agreed(dist, lambda: check_plan_file(plan))
        for note in plan.notes:
            _say(dist, f"note: {note}")
        agreed(dist, lambda: write_plan(plan) if dist.is_main else None)
        dist.barrier()
        return _sweep(plan, dist)
    except UserError as e:
        if dist.is_main:
            print_error(e)
        return 2
    except KeyboardInterrupt as e:
        what, status = stop_status(e)
        if dist.is_main:
            print(f"\n{what}; rerun the same command to continue", file=sys.stderr)
        return status


def _say(dist, msg: str) -> None:
    if dist.is_main:
        print(f"[reproduce] {msg}", flush=True)


def _sweep(plan: Plan, dist) -> int:
    est = estimate_stages(plan, dist)
    _say(dist, f"{len(plan.stages)} stages; remaining work about {fmt_duration(sum(est.values()))} on this machine")
    t_start, spent, spent_est = time.perf_counter(), 0.0, 0.0
    for i, s in enumerate(plan.stages, 1):
        head = f"{i}/{len(plan.stages)} {s.kind} {s.name}"
        t0 = time.perf_counter()
        if s.kind == "train":
            state = train_state(s)
            if state == "done":
                _say(dist, f"{head}: finished before, skipped")
                continue
            if teacher_idle(plan, s):
                _say(dist, f"{head}: not needed, every distillation run is finished; skipped")
                continue
            _say(dist, f"{head}: {'resuming' if state == 'resume' else 'starting'} {s.run_dir}")
            status = _stage(dist, head, lambda s=s, state=state: _train(plan, s, state, dist))
        else:
            if eval_done(plan, s.run_dir):
                _say(dist, f"{head}: finished before, skipped")
                continue
            _say(dist, f"{head}: evaluate {s.run_dir} ({','.join(plan.eval_settings.attacks)})")
            status = _stage(dist, head, lambda s=s, head=head: _evaluate(plan, s, dist, head))
        if status != 0:
            return status
        took = time.perf_counter() - t0
        spent += took
        spent_est += est.pop((s.name, s.kind), 0.0)
        left = sum(est.values()) * (spent / spent_est if spent_est > 0 else 1.0)  # scaled by how estimates fared
        _say(dist, f"{head}: done in {fmt_duration(took)}; remaining about {fmt_duration(left)}")
    if dist.is_main:
        paths = _write_results(plan, dist)
        print(Path(paths[0]).read_text())
        _say(dist, f"all done in {fmt_duration(time.perf_counter() - t_start)}: {', '.join(map(str, paths))}")
    dist.barrier()
    return 0


def _write_results(plan: Plan, dist) -> list:
    """table2.* then the curves, each file replaced whole (atomic) or not at all. A failure is one line that
    names the file and says what was written: every stage is finished, so a rerun only writes these."""
    written: list = []
    try:
        rows = collect(plan)
        prov = provenance(plan.run_settings.data, dataset_of(plan), plan.opts.data_provenance)
        written += write_table(plan, rows, prov)
        paths, notes = write_curves(plan)
        written += paths
    except (UserError, OSError) as e:
        msg = f"{e.filename}: {e.strerror or e}" if isinstance(e, OSError) and e.filename else str(e)
        done = f"written: {', '.join(p.name for p in written)}" if written else "nothing of the table written"
        raise UserError(f"{msg}; {done}; once that is fixed, rerun the same command to write the rest") from None
    for note in notes:
        _say(dist, f"note: {note}")
    return written


def _train(plan: Plan, s, state: str, dist) -> None:
    download = False if plan.opts.no_download else "auto"
    progress = not plan.opts.no_progress
    if state == "resume":
        engine.resume(s.run_dir, dist=dist, download=download, progress=progress)
    else:
        eval_n_given = s.settings is None or s.settings.eval_n is not None
        engine.train(s.cfg, s.run_dir, dist=dist, download=download, eval_n_given=eval_n_given, progress=progress)


def _evaluate(plan: Plan, s, dist, head: str) -> None:
    """One run's evaluation under its run lock (rank 0's, as training's): a second sweep on the same --out
    stops with "in use by another process (pid N)" instead of attacking the same checkpoints and racing to
    write eval.json; one that waited its turn finds the evaluation done under the lock and skips it."""
    lock = agreed(dist, lambda: RunLock(s.run_dir) if dist.is_main else None)
    try:
        if dist.all_gather_object(eval_done(plan, s.run_dir))[0]:  # rank 0's answer for all
            _say(dist, f"{head}: finished meanwhile by another process, skipped")
            return
        command = "python -m rslad_fast.reproduce " + " ".join(sys.argv[1:])
        report = evaluate_run(s.run_dir, plan.eval_settings, dist=dist, command=command)
        if dist.is_main:
            eval_report.write(report)
    finally:
        if lock is not None:
            lock.close()


def _stage(dist, head: str, body) -> int:
    """Run one stage; a failure is one error line with the sweep's own advice (rerun the same command: the
    finished stages are skipped, a killed run resumes), and its exit status."""
    try:
        body()
        return 0
    except engine.Diverged as e:
        status, msg = 1, str(e)
    except (UserError, WriteError) as e:
        if isinstance(e, Agreed) and not dist.is_main:
            return 2
        status, msg = 2, str(e)
    except OSError as e:
        status, msg = 2, f"{e.filename or head}: {e.strerror or e}"
    if dist.is_main or status != 1:
        print_error(f"{msg}; {head} stopped: rerun the same command to continue from there")
    return status
