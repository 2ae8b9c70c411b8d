"""The sweep's plan: its stages as typed engine calls (a :class:`Config` per training run, one
:class:`EvalSettings` for every evaluation), ``DIR/plan.json``, and what of it is done.

The runs' settings come from the flags ``reproduce`` shares with ``train`` (``run_flags.py``) as one
``RunSettings``; each run takes the part that applies to its method (``RunSettings.for_method``), the
self-trained teacher is the one ``train`` would train for itself (``engine.resolve``'s ``teacher_run``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

from rslad_fast import methods
from rslad_fast.atomic import atomic_write_bytes
from rslad_fast.engine.config import Config
from rslad_fast.engine.preparation import file_sha256, prepare, read_data, use_teacher_cache
from rslad_fast.engine.resolution import resolve
from rslad_fast.engine.rundir import TEACHER, RunDir
from rslad_fast.engine.settings import RunSettings
from rslad_fast.errors import UserError
from rslad_fast.evaluation.settings import DefaultN, EvalSettings
from rslad_fast.models import canonical_name
from rslad_fast.run_flags import flag_of, settings_from_args

PLAN = "plan.json"
PLAN_FORMAT = 1
# the run settings reproduce sets itself, per run (their flags are refused)
OWNED = ("method", "student")
# evaluate's settings that do not change its figures: not compared with a finished eval.json's
EVAL_NEUTRAL = ("run", "ckpt", "out", "batch_size", "no_progress", "verbose", "attacks")


@dataclasses.dataclass
class Stage:
    kind: str  # "train" or "evaluate"
    name: str  # "teacher" or "<method>-<student>"
    run_dir: Path
    cfg: Optional[Config] = None  # the run's Config (train; an evaluation's run's, too)
    settings: Optional[RunSettings] = None  # what resolved into cfg (its eval_n given or the preset's)
    method: Optional[str] = None
    student: Optional[str] = None


@dataclasses.dataclass
class Plan:
    out: Path
    settings: dict  # what plan.json holds and a rerun must match
    stages: list
    eval_settings: EvalSettings  # every evaluation's, but for its run
    opts: argparse.Namespace  # reproduce's own options
    run_settings: RunSettings  # the run settings given, shared by every run they apply to
    notes: list = dataclasses.field(default_factory=list)  # what check_plan_file found and did, for the log


def make_plan(opts: argparse.Namespace) -> Plan:
    """Validate everything and lay out the stages; reads files, writes nothing."""
    # reproduce's own --preset, --teacher and --teacher-arch share their names with run settings: not those
    given = settings_from_args(opts).replace(preset=None, teacher=None, teacher_arch=None)
    owned = [flag_of(k) for k in OWNED if getattr(given, k) is not None]
    owned += [f"--{k}" for k in ("resume", "overwrite") if getattr(opts, k, None)]
    if owned:
        raise UserError(f"{', '.join(owned)}: set by reproduce for each run; see --help")
    # one absolute data path for every run, every evaluation and the plan: the same command from another
    # folder is another data set
    given = given.replace(data=str(Path(given.data or "./data").expanduser().resolve()))
    out = Path(opts.out)
    distill = [m for m in opts.methods if methods.get(m).needs_teacher]
    if opts.teacher_arch and not distill:
        raise UserError("--teacher-arch: no distillation method in --methods")
    if opts.teacher is not None and not distill:
        raise UserError("--teacher: no distillation method in --methods")
    unused = sorted(set(given.hparams) - {k for m in opts.methods for k in methods.get(m).HPARAMS})
    if unused:
        flags = ", ".join(flag_of(k) for k in unused)
        raise UserError(f"{flags}: a hyperparameter of none of the methods {','.join(opts.methods)}")
    for name in RunSettings.TEACHER_ONLY:
        if getattr(given, name) is not None and not distill:
            raise UserError(f"{flag_of(name)}: no distillation method in --methods")
    if (given.nat_teacher or given.nat_teacher_arch) and not any(
        getattr(methods.get(m), "needs_nat_teacher", False) for m in opts.methods
    ):
        raise UserError("--nat-teacher/--nat-teacher-arch: no method in --methods takes a natural teacher (mtard)")

    stages = []
    teacher_arch = canonical_name(opts.teacher_arch) if opts.teacher_arch else None
    base = given.replace(preset=opts.preset, teacher_arch=teacher_arch)
    if distill and opts.teacher is None:
        # the teacher train would train for itself, trained once for every distillation run
        first = resolve(base.for_method(methods.get(distill[0])).replace(method=distill[0], student=opts.students[0]))
        tcfg = Config.from_dict(dict(first.teacher_run))
        teacher_arch = tcfg.student
        stages.append(Stage("train", TEACHER, out / TEACHER, tcfg, None, "trades", teacher_arch))
        base = base.replace(teacher=str(RunDir(out / TEACHER).last), teacher_arch=teacher_arch)
    elif distill:
        path = Path(opts.teacher).expanduser()
        if not path.is_file():
            raise UserError(f"--teacher {opts.teacher}: no such file")
        base = base.replace(teacher=str(path.resolve()))

    runs = []
    for student in opts.students:
        for method in opts.methods:
            name = f"{method}-{student}"
            s = base.for_method(methods.get(method)).replace(method=method, student=student)
            cfg = resolve(s)  # every setting of every run checked before any work
            runs.append(Stage("train", name, out / name, cfg, s, method, student))
    stages += runs
    _check_inputs(stages, given, opts)
    stages += [Stage("evaluate", r.name, r.run_dir, r.cfg, r.settings, r.method, r.student) for r in runs]

    eval_settings = EvalSettings(
        attacks=list(opts.attacks),
        n=opts.n,
        batch_size=opts.eval_batch_size,
        data=given.data,
        device=given.device,
        no_download=bool(opts.no_download),
        no_progress=bool(opts.no_progress),
    )
    train_flags = given.given()
    if opts.no_download:
        train_flags["no_download"] = True
    settings = {
        "format": PLAN_FORMAT,
        "preset": opts.preset,
        "students": opts.students,
        "methods": opts.methods,
        "teacher": {
            "file": str(Path(opts.teacher).expanduser().resolve()) if opts.teacher else None,
            "arch": teacher_arch if (opts.teacher_arch or opts.teacher is None) and distill else None,
            "sha256": file_sha256(opts.teacher) if opts.teacher and distill else None,
        },
        "train_flags": train_flags,
        # without the batch size, which changes memory only: an evaluation that ran out of it can be retried
        # smaller
        "evaluate_flags": _evaluate_record(eval_settings),
        "runs": [s.name for s in stages if s.kind == "train"],
    }
    return Plan(out, settings, stages, eval_settings, opts, given)


def _evaluate_record(e: EvalSettings) -> list:
    """The evaluation's planned settings as plan.json has recorded them since its first version (evaluate's
    flags), so that a sweep begun then is the same plan now."""
    rec = ["--attacks", ",".join(e.attacks)]
    rec += [] if isinstance(e.n, DefaultN) else ["--n", str(e.n)]
    rec += ["--data", e.data] + (["--device", e.device] if e.device else [])
    return rec + (["--no-download"] if e.no_download else [])


def _check_inputs(stages: list, given: RunSettings, opts: argparse.Namespace) -> None:
    """What can fail on user input, through the engine's own checks, before anything is written (a failure
    found after hours of training would need another --out): the data and the first run's settings; a given
    teacher file (loaded and matched against its architecture and the data set's class count) through the
    first distillation run, and with a self-trained teacher that run's teacher-logit cache; --n against the
    test set. A dry run never downloads."""
    download = False if (opts.no_download or opts.dry_run) else "auto"
    distill = [s for s in stages if methods.get(s.method).needs_teacher and s.name != TEACHER]
    self_trained = stages[0].name == TEACHER
    checks = stages[:1] + [s for s in distill[:1] if s is not stages[0] and not self_trained]
    full = None
    for stage in checks:
        cfg = dataclasses.replace(stage.cfg)
        full = full or read_data(cfg, download)
        prepare(cfg, download=download, full=full, eval_n_given=given.eval_n is not None)
    if self_trained and distill:  # its teacher file does not exist yet: the cache is sized from the data alone
        cfg = distill[0].cfg
        use_teacher_cache(cfg, min(cfg.train_n or len(full[0][1]), len(full[0][1])), [])
    n_test = len(full[1][1])
    if not isinstance(opts.n, DefaultN) and opts.n > n_test:
        raise UserError(f"--n {opts.n} exceeds the {n_test} test images in {given.data}")


def check_plan_file(plan: Plan) -> bool:
    """True when DIR already holds this plan; UserError when it holds another (or DIR cannot be a sweep).

    A plan.json that is gone or damaged (truncated, random bytes, no plan object) while the runs are intact
    strands nothing: the plan is rebuilt from this command and checked against what each run folder's own
    config.json says (:func:`_check_runs`), refused only on a real difference; a note in ``plan.notes``
    says so (write_plan then writes the rebuilt plan)."""
    out, path = plan.out, plan.out / PLAN
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not path.is_file():
        if out.is_dir() and RunDir(out).content():
            foreign = [p.name for p in RunDir(out).content() if not _sweep_entry(plan, p)]
            if foreign:
                raise UserError(
                    f"--out {out}: not empty and holds no {PLAN} ({foreign[0]} is no part of a sweep); not a sweep "
                    "folder, use another --out"
                )
            return _rebuilt(plan, "missing")
        return False
    try:
        old = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror or e}); fix its permissions and rerun") from None
    except ValueError as e:  # truncated JSON, random bytes (a UnicodeDecodeError is a ValueError)
        return _rebuilt(plan, f"damaged ({type(e).__name__})")
    if not isinstance(old, dict) or "format" not in old or not isinstance(old.get("runs"), list):
        return _rebuilt(plan, "damaged (no plan object)")
    diff = [k for k in sorted(set(old) | set(plan.settings)) if old.get(k) != plan.settings.get(k)]
    if diff and not _started(plan.out, old):
        return False  # nothing of it ran: the new plan replaces it
    if diff:
        k = diff[0]
        raise UserError(
            f"{path} holds a different plan ({k}: {json.dumps(old.get(k))} there, {json.dumps(plan.settings.get(k))} "
            f"now); rerun with its settings to continue it, or use another --out"
        )
    return True


# what a sweep folder holds besides its run folders: the plan, the table and the curves
_SWEEP_FILES = re.compile(r"plan\.json|table2\.(md|csv|json)|curves-.+\.png")


def _sweep_entry(plan: Plan, p: Path) -> bool:
    """Whether ``p`` (an entry of --out) can be part of a sweep: a file the sweep writes, a planned run's
    folder, or a run folder (checked against the plan by :func:`_check_runs`)."""
    if p.is_dir():
        return p.name in {s.name for s in plan.stages} or RunDir(p).has_config()
    return _SWEEP_FILES.fullmatch(p.name) is not None


def _rebuilt(plan: Plan, why: str) -> bool:
    """The plan of this command replaces a missing or damaged plan.json, once every run folder agrees."""
    checked = _check_runs(plan)
    if checked:
        plan.notes.append(
            f"{plan.out / PLAN} was {why}: rebuilt from this command, which agrees with the config.json of "
            f"{checked} run folder{'s' if checked > 1 else ''} there"
        )
    return bool(checked)


# Config fields this machine chooses where no flag does (engine/resolution.py): the same command on another
# machine, or the runs' own choices, are no difference from what the command asks
_MACHINE = {"device": "device", "threads": "threads", "amp": "amp", "channels_last": "channels_last"}


def _check_runs(plan: Plan) -> int:
    """How many run folders of --out this plan's runs agree with; UserError naming the first real
    difference: a run folder of no planned run, or a config.json setting other than this command's."""
    planned = {s.name: s for s in plan.stages if s.kind == "train"}
    count = 0
    for p in sorted(plan.out.iterdir()) if plan.out.is_dir() else []:
        rd = RunDir(p)
        if not (p.is_dir() and rd.has_config()):
            continue
        if p.name not in planned:
            raise UserError(
                f"{rd.config}: a run of no stage of this command (its runs: {', '.join(planned)}); rerun with "
                f"the --students/--methods/--teacher that made it, or use another --out"
            )
        try:
            d = rd.config_dict()  # its errors name the file
            disk = Config.from_dict(d).to_dict()
        except UserError as e:
            where = "" if str(rd.config) in str(e) else f"{rd.config}: "
            raise UserError(f"{where}{e}; move that folder away or use another --out") from None
        stage = planned[p.name]
        key = _difference(disk, stage.cfg.to_dict(), plan)
        if key is not None:
            there, now = _get(disk, key), _get(stage.cfg.to_dict(), key)
            raise UserError(
                f"{rd.config} says {key} {json.dumps(there)}, this command {json.dumps(now)}; rerun with the "
                f"settings that made it, or use another --out"
            )
        count += 1
    return count


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _difference(disk: dict, planned: dict, plan: Plan) -> Optional[str]:
    """The first key (dotted) where a run's config.json differs from the planned Config beyond what this
    machine or the run's start filled in: the library versions, an unflagged machine choice (_MACHINE, the
    teacher's dtype), a teacher file's sha256 recorded at the start, a preset eval_n shrunk to the test set."""
    given = plan.run_settings
    own_teacher = plan.stages[0].name == TEACHER  # the distillation runs learn from --out's teacher/last.pt

    def norm(d: dict, other: dict) -> dict:
        d = json.loads(json.dumps(d))
        d.pop("versions", None)
        for key, flag in _MACHINE.items():
            if getattr(given, flag) is None:
                d.pop(key, None)
        if given.eval_n is None and isinstance(d.get("eval_n"), int) and isinstance(other.get("eval_n"), int):
            d["eval_n"] = max(d["eval_n"], other["eval_n"])  # shrunk to a smaller test set by the engine
        if isinstance(d.get("teacher"), dict):
            d["teacher"].pop("sha256", None)
            if given.teacher_dtype is None:
                d["teacher"].pop("dtype", None)
            if own_teacher and Path(str(d["teacher"].get("path"))).parts[-2:] == (TEACHER, "last.pt"):
                d["teacher"]["path"] = "the sweep's teacher"  # the folder may have moved since (a copy)
        if isinstance(d.get("nat_teacher"), dict):  # MTARD's natural teacher: its sha256 is the start's too
            d["nat_teacher"].pop("sha256", None)
        if isinstance(d.get("teacher_run"), dict) and isinstance(other.get("teacher_run"), dict):
            d["teacher_run"] = norm(d["teacher_run"], other["teacher_run"])
        return d

    a, b = norm(disk, planned), norm(planned, disk)
    sha = plan.settings["teacher"].get("sha256")
    if sha and isinstance(disk.get("teacher"), dict) and disk["teacher"].get("source") == "file":
        if disk["teacher"].get("sha256") not in (None, sha):
            return "teacher.sha256"  # another teacher file than the one given now
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                sub = next(j for j in sorted(set(a[k]) | set(b[k])) if a[k].get(j) != b[k].get(j))
                return f"{k}.{sub}"
            return k
    return None


def _started(out: Path, old: dict) -> bool:
    """Whether any run of the plan ``old`` has begun (its run directory holds a config.json)."""
    runs = old.get("runs")
    if not isinstance(runs, list):
        return True  # not a plan we can read: never replaced
    return any(isinstance(n, str) and RunDir(out / Path(n).name).has_config() for n in runs)


def write_plan(plan: Plan) -> None:
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(plan.out / PLAN, (json.dumps(plan.settings, indent=2) + "\n").encode())
    except OSError as e:
        raise UserError(f"--out {plan.out}: cannot write {PLAN}: {e.strerror or e}") from None


# ---- What is done ------------------------------------------------------------------------------------------


def completed_epochs(run_dir: Path) -> tuple:
    """(completed epochs, planned epochs) of a run directory; (0, None) without config.json."""
    return RunDir(run_dir).completed_epochs()


def train_state(stage: Stage) -> str:
    """``done``, ``resume`` (a run directory with config.json) or ``new``."""
    done, epochs = completed_epochs(stage.run_dir)
    if epochs is None:
        return "new"
    return "done" if done >= epochs else "resume"


def teacher_needed(plan: Plan) -> bool:
    """Whether the self-trained teacher has work to serve: a distillation run not finished yet. The
    evaluations and the table never load it, so a deleted teacher/ is not retrained for them."""
    return any(
        s.kind == "train" and s.name != TEACHER and methods.get(s.method).needs_teacher and train_state(s) != "done"
        for s in plan.stages
    )


def _json(value):
    return json.loads(json.dumps(value, default=str))


def eval_done(plan: Plan, run_dir: Path) -> bool:
    """An eval.json newer than last.pt made with the planned evaluation: the same attacks and every other
    setting of evaluate's (images, eps, seed, data, each attack's hyperparameters) as planned, so that one
    made by hand with other settings is redone, not taken into the table."""
    rd = RunDir(run_dir)
    path, last = rd.eval_json, rd.last
    if not (path.is_file() and last.is_file()) or path.stat().st_mtime < last.stat().st_mtime:
        return False
    try:
        report = json.loads(path.read_text())
        config = report["config"]
        planned = plan.eval_settings.replace(run=str(run_dir)).to_dict()
        # a setting the plan leaves to evaluate (None: the data set and normalization from the run's
        # config.json) is whatever evaluate made of it
        same = all(
            _json(v) == _json(config.get(k)) for k, v in planned.items() if k not in EVAL_NEUTRAL and v is not None
        )
        return (
            same
            and report.get("columns") == list(plan.opts.attacks)
            and {r.get("label") for r in report.get("rows", [])} >= {"best", "last"}
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def teacher_idle(plan: Plan, s) -> bool:
    """The self-trained teacher's stage when no distillation run has training left to use it."""
    return s.kind == "train" and s.name == TEACHER and not teacher_needed(plan)
