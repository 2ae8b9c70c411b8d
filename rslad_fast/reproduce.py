"""The paper's Table 2 and training curves from one resumable command: ``python -m rslad_fast.reproduce``.

    # what it would do and what it would cost on this machine; changes nothing
    python -m rslad_fast.reproduce --out sweeps/quick --preset quick --dry-run

    # a CPU-sized sweep: RSLAD and SAT, MobileNetV2, the quick preset's self-trained teacher, 500 test images
    python -m rslad_fast.reproduce --out sweeps/quick --preset quick --students mnv2 --methods sat,rslad --n 500

    # the paper (a GPU machine): every method, both students, TRADES' WRN-34-10 as the teacher, 10,000 images
    python -m rslad_fast.reproduce --out sweeps/paper --teacher model_cifar_wrn.pt --teacher-arch wrn34-10

    # killed at any moment: the same command again skips what is finished and resumes the rest
    python -m rslad_fast.reproduce --out sweeps/paper --teacher model_cifar_wrn.pt --teacher-arch wrn34-10

The sweep is a list of stages, each an ordinary command of this package run in this process:

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
is refused (use another --out). A stage is finished when its files say so (a run's ``last.pt`` at its last
epoch; an ``eval.json`` newer than it with the planned attacks and n): a rerun skips those, resumes a killed
run from its ``last.pt`` and redoes an interrupted evaluation. Under torchrun every run and every evaluation
is distributed as ``train`` and ``evaluate`` are, and rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from rslad_fast.cli import Parser, agreed, print_error, torchrun_main
from rslad_fast.errors import UserError

PLAN = "plan.json"
PLAN_FORMAT = 1
TEACHER_DIR = "teacher"
DEFAULT_STUDENTS = ("resnet18", "mnv2")  # the paper's two students (Table 2)
DEFAULT_METHODS = ("natural", "sat", "trades", "ard", "iad", "rslad")  # Table 2's rows (MART: --methods)
# train's flags that reproduce sets itself, per run
OWNED = ("method", "student", "teacher", "teacher_arch", "preset", "out", "resume", "overwrite")
# the settings a self-trained teacher shares with its student run: train.resolve_config's teacher command
# line (tests/test_reproduce.py checks that DIR/teacher's config equals the teacher train would train)
TEACHER_SHARED = (
    "data",
    "dataset",
    "seed",
    "device",
    "loader",
    "threads",
    "train_n",
    "eval_n",
    "amp",
    "channels_last",
    "allow_tf32",
    "sync_bn",
    "no_download",
    "wrn70_16_norm",
)
# train's flags that only a distillation run takes
TEACHER_ONLY = ("teacher_cache", "teacher_dtype")
# the dry run times each training step and evaluation pass at most at this batch size and scales it linearly:
# a paper-sized step (WRN-34-10 TRADES at 128) takes minutes on a CPU, a step's cost is close to linear in the
# batch there, and on a GPU a small batch errs on the slow side; it also bounds the dry run's memory (a paper
# sweep's dry run that timed its evaluation passes at evaluate's batch of 250 was seen at 14.6 GB on the CPU)
MEASURE_BATCH = 32
TRAIN_IMAGES = 50000  # CIFAR-10's and CIFAR-100's training sets, for a run on all of them

# ---- The paper's Table 2 (CIFAR-10, last checkpoint), as ../shared/METHODS.md transcribes it ------------
PAPER_COLUMNS = ("clean", "fgsm", "pgd20-sat", "pgd20-trades", "cw", "aa")
_PAPER_ROWS = {
    ("resnet18", "sat"): (84.44, 55.37, 46.22, 48.72, 47.14, 43.64),
    ("resnet18", "trades"): (82.20, 57.86, 52.30, 53.66, 50.69, 49.27),
    ("resnet18", "ard"): (84.23, 59.33, 51.52, 53.74, 51.24, 48.90),
    ("resnet18", "iad"): (83.90, 58.95, 51.35, 53.15, 50.52, 48.48),
    ("resnet18", "rslad"): (83.33, 59.90, 54.14, 55.61, 53.22, 51.32),
    ("mnv2", "sat"): (82.89, 56.43, 49.71, 51.48, 49.07, 45.92),
    ("mnv2", "trades"): (80.57, 56.05, 51.06, 52.36, 49.36, 47.17),
    ("mnv2", "ard"): (83.42, 57.94, 50.63, 52.44, 50.09, 48.01),
    ("mnv2", "iad"): (83.49, 57.44, 49.77, 51.85, 49.41, 46.98),
    ("mnv2", "rslad"): (83.11, 59.08, 53.04, 54.50, 51.60, 49.90),
}
PAPER = {key: dict(zip(PAPER_COLUMNS, row)) for key, row in _PAPER_ROWS.items()}
# natural training: the paper gives the clean accuracy and 0.0 under PGD only
PAPER[("resnet18", "natural")] = {"clean": 94.65, "pgd20-sat": 0.0, "pgd20-trades": 0.0}
PAPER[("mnv2", "natural")] = {"clean": 92.78, "pgd20-sat": 0.0, "pgd20-trades": 0.0}
MODEL_NAMES = {"resnet18": "RN-18", "mnv2": "MNV2"}
METHOD_NAMES = {"natural": "Natural", "sat": "SAT", "trades": "TRADES", "mart": "MART", "ard": "ARD"}
METHOD_NAMES.update({"iad": "IAD", "rslad": "RSLAD"})


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
    from rslad_fast import methods
    from rslad_fast.evaluate import DefaultN, _attack_list
    from rslad_fast.evaluation.robustness import ATTACKS
    from rslad_fast.models import ARCHS, canonical_name

    from .cli import integer

    p = Parser(
        prog="python -m rslad_fast.reproduce",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n" + __doc__.split("\n\n", 1)[1].split("\n\nThe sweep")[0] + "\n\nEvery other flag "
        "of `python -m rslad_fast.train` (--data, --device, --seed, --epochs, --amp, a method's hyperparameter, "
        "...) is passed to every run it applies to.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # no abbreviations: what this parser does not know goes to train's, and "--data" must not be taken
        # for this parser's --data-provenance
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
        type=_attack_list,
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
    return p


# ---- The plan ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    kind: str  # "train" or "evaluate"
    name: str  # "teacher" or "<method>-<student>"
    run_dir: Path
    args: Optional[argparse.Namespace] = None  # train's parsed arguments of a new run
    method: Optional[str] = None
    student: Optional[str] = None


@dataclasses.dataclass
class Plan:
    out: Path
    settings: dict  # what plan.json holds and a rerun must match
    stages: list
    train_parser: argparse.ArgumentParser
    eval_argv: list  # evaluate's flags besides --run
    opts: argparse.Namespace
    rest: argparse.Namespace  # train's flags given here


def _train_args(parser, tokens: list, rest: argparse.Namespace, keep) -> argparse.Namespace:
    """train's namespace for ``tokens`` plus the attributes of ``rest`` that ``keep(name)`` accepts."""
    args = parser.parse_args(tokens)
    for name, value in vars(rest).items():
        if name not in OWNED and keep(name):
            setattr(args, name, value)
    return args


def _given(parser, ns: argparse.Namespace) -> dict:
    """The flags of ``ns`` that differ from train's defaults, as {dest: JSON-able value}."""
    out = {}
    for a in parser._actions:
        if a.option_strings and getattr(ns, a.dest, a.default) != a.default:
            v = getattr(ns, a.dest)
            out[a.dest] = v if isinstance(v, (bool, int, float, str, type(None))) else list(v)
    return out


def make_plan(opts: argparse.Namespace, rest_tokens: list) -> Plan:
    """Validate everything and lay out the stages; reads files, writes nothing."""
    from rslad_fast import methods
    from rslad_fast import train as train_cli
    from rslad_fast.engine.runner import file_sha256
    from rslad_fast.evaluate import DefaultN
    from rslad_fast.models import canonical_name

    parser = train_cli.build_parser()
    parser.prog = "python -m rslad_fast.reproduce"  # its errors name the command the user typed
    rest = parser.parse_args(rest_tokens)
    # one absolute data path for every run, every evaluation and the plan: the same command from another
    # folder is another data set
    rest.data = str(Path(rest.data or "./data").expanduser().resolve())
    owned = [f"--{k.replace('_', '-')}" for k in OWNED if getattr(rest, k, None) not in (None, False)]
    if owned:
        raise UserError(f"{', '.join(owned)}: set by reproduce for each run; see --help")
    out = Path(opts.out)
    distill = [m for m in opts.methods if methods.get(m).needs_teacher]
    if opts.teacher_arch and not distill:
        raise UserError("--teacher-arch: no distillation method in --methods")
    if opts.teacher is not None and not distill:
        raise UserError("--teacher: no distillation method in --methods")
    given_hp = {k for k, v in vars(rest).items() if k.startswith("hp_") and v is not None}
    used_hp = {f"hp_{k}" for m in opts.methods for k in methods.get(m).HPARAMS}
    if given_hp - used_hp:
        flags = ", ".join("--" + k[3:].replace("_", "-") for k in sorted(given_hp - used_hp))
        raise UserError(f"{flags}: a hyperparameter of none of the methods {','.join(opts.methods)}")
    for name in TEACHER_ONLY:
        if getattr(rest, name, None) is not None and not distill:
            raise UserError(f"--{name.replace('_', '-')}: no distillation method in --methods")

    stages = []
    teacher_flags: list = []
    teacher_arch = canonical_name(opts.teacher_arch) if opts.teacher_arch else None
    if distill and opts.teacher is None:
        preset = train_cli.PRESETS[opts.preset]
        teacher_arch = teacher_arch or preset.teacher_arch
        targs = _train_args(
            parser,
            ["--method", "trades", "--student", teacher_arch, "--preset", opts.preset, "--out", str(out / TEACHER_DIR)],
            rest,
            lambda k: k in TEACHER_SHARED,
        )
        if rest.train_n is None and preset.teacher_train_n is not None:
            targs.train_n = preset.teacher_train_n
        targs.epochs = preset.teacher_epochs
        stages.append(Stage("train", TEACHER_DIR, out / TEACHER_DIR, targs, "trades", teacher_arch))
        teacher_flags = ["--teacher", str(out / TEACHER_DIR / "last.pt"), "--teacher-arch", teacher_arch]
    elif distill:
        path = Path(opts.teacher).expanduser()
        if not path.is_file():
            raise UserError(f"--teacher {opts.teacher}: no such file")
        teacher_flags = ["--teacher", str(path.resolve())] + (["--teacher-arch", teacher_arch] if teacher_arch else [])

    runs = []
    for student in opts.students:
        for method in opts.methods:
            cls = methods.get(method)
            name = f"{method}-{student}"
            tokens = ["--method", method, "--student", student, "--preset", opts.preset, "--out", str(out / name)]
            tokens += teacher_flags if cls.needs_teacher else []
            own_hp = {f"hp_{k}" for k in cls.HPARAMS}
            args = _train_args(
                parser,
                tokens,
                rest,
                lambda k, own_hp=own_hp, cls=cls: (
                    (not k.startswith("hp_") or k in own_hp) and (cls.needs_teacher or k not in TEACHER_ONLY)
                ),
            )
            train_cli.resolve_config(args)  # every setting of every run checked before any work
            runs.append(Stage("train", name, out / name, args, method, student))
    stages += runs
    _check_inputs(stages, rest, opts)
    stages += [Stage("evaluate", r.name, r.run_dir, None, r.method, r.student) for r in runs]

    eval_argv = ["--batch-size", str(opts.eval_batch_size), "--attacks", ",".join(opts.attacks)]
    if not isinstance(opts.n, DefaultN):
        eval_argv += ["--n", str(opts.n)]
    eval_argv += ["--data", rest.data] + (["--device", rest.device] if rest.device else [])
    eval_argv += ["--no-download"] if rest.no_download else []
    settings = {
        "format": PLAN_FORMAT,
        "preset": opts.preset,
        "students": opts.students,
        "methods": opts.methods,
        "teacher": {
            "file": str(Path(opts.teacher).expanduser().resolve()) if opts.teacher else None,
            "arch": teacher_arch,
            "sha256": file_sha256(opts.teacher) if opts.teacher and distill else None,
        },
        "train_flags": _given(parser, rest),
        # without --batch-size, which changes memory only: an evaluation that ran out of it can be retried smaller
        "evaluate_flags": eval_argv[2:],
        "runs": [s.name for s in stages if s.kind == "train"],
    }
    return Plan(out, settings, stages, parser, eval_argv, opts, rest)


def _check_inputs(stages: list, rest: argparse.Namespace, opts: argparse.Namespace) -> None:
    """What can fail on user input, through train's and evaluate's own checks, before anything is written
    (a failure found after hours of training would need another --out): the data and the first run's
    settings; a given teacher file (loaded and matched against its architecture and the data set's class
    count) through the first distillation run, and with a self-trained teacher that run's teacher-logit cache;
    evaluate's --n against the test set. A dry run never downloads."""
    from rslad_fast import methods
    from rslad_fast import train as train_cli
    from rslad_fast.engine.runner import prepare, read_data, use_teacher_cache
    from rslad_fast.evaluate import DefaultN

    download = False if (rest.no_download or opts.dry_run) else "auto"
    distill = [s for s in stages if methods.get(s.method).needs_teacher and s.name != TEACHER_DIR]
    self_trained = stages[0].name == TEACHER_DIR
    checks = stages[:1] + [s for s in distill[:1] if s is not stages[0] and not self_trained]
    full = None
    for stage in checks:
        cfg = train_cli.resolve_config(stage.args)
        full = full or read_data(cfg, download)
        prepare(cfg, download=download, full=full, eval_n_given=rest.eval_n is not None)
    if self_trained and distill:  # its teacher file does not exist yet: the cache is sized from the data alone
        cfg = train_cli.resolve_config(distill[0].args)
        use_teacher_cache(cfg, min(cfg.train_n or len(full[0][1]), len(full[0][1])), [])
    n_test = len(full[1][1])
    if not isinstance(opts.n, DefaultN) and opts.n > n_test:
        raise UserError(f"--n {opts.n} exceeds the {n_test} test images in {rest.data}")


def check_plan_file(plan: Plan) -> bool:
    """True when DIR already holds this plan; UserError when it holds another (or DIR cannot be a sweep)."""
    out, path = plan.out, plan.out / PLAN
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not path.is_file():
        if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
            raise UserError(f"--out {out}: not empty and holds no {PLAN}; not a sweep folder, use another --out")
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); not a sweep of this version, use another --out") from None
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a plan (a JSON object expected)")
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


def _started(out: Path, old: dict) -> bool:
    """Whether any run of the plan ``old`` has begun (its run directory holds a config.json)."""
    runs = old.get("runs")
    if not isinstance(runs, list):
        return True  # not a plan we can read: never replaced
    return any(isinstance(n, str) and (out / Path(n).name / "config.json").exists() for n in runs)


def write_plan(plan: Plan) -> None:
    from rslad_fast.engine.checkpoint import atomic_write_bytes

    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(plan.out / PLAN, (json.dumps(plan.settings, indent=2) + "\n").encode())
    except OSError as e:
        raise UserError(f"--out {plan.out}: cannot write {PLAN}: {e.strerror or e}") from None


# ---- What is done ------------------------------------------------------------------------------------------


def completed_epochs(run_dir: Path) -> tuple:
    """(completed epochs, planned epochs) of a run directory; (0, None) without config.json."""
    from rslad_fast.engine.checkpoint import load_checkpoint
    from rslad_fast.engine.config import read_config_file

    if not (run_dir / "config.json").is_file():
        return 0, None
    epochs = read_config_file(run_dir / "config.json").get("epochs")
    if not (run_dir / "last.pt").is_file():
        return 0, epochs
    return int(load_checkpoint(run_dir / "last.pt")["epoch"]), epochs


def train_state(stage: Stage) -> str:
    """``done``, ``resume`` (a run directory with config.json) or ``new``."""
    done, epochs = completed_epochs(stage.run_dir)
    if epochs is None:
        return "new"
    return "done" if done >= epochs else "resume"


# evaluate's settings that do not change its figures: not compared with a finished eval.json's
EVAL_NEUTRAL = ("run", "ckpt", "out", "batch_size", "no_progress", "verbose", "attacks")


def _json(value):
    return json.loads(json.dumps(value, default=str))


def eval_done(plan: Plan, run_dir: Path) -> bool:
    """An eval.json newer than last.pt made with the planned evaluation: the same attacks and every other
    setting of evaluate's (images, eps, seed, data, each attack's hyperparameters) as planned, so that one
    made by hand with other settings is redone, not taken into the table."""
    from rslad_fast import evaluate as evaluate_cli

    path, last = run_dir / "eval.json", run_dir / "last.pt"
    if not (path.is_file() and last.is_file()) or path.stat().st_mtime < last.stat().st_mtime:
        return False
    try:
        report = json.loads(path.read_text())
        config = report["config"]
        planned = vars(evaluate_cli.build_parser().parse_args(["--run", str(run_dir)] + plan.eval_argv))
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


# ---- The estimate ------------------------------------------------------------------------------------------


def estimate_stages(plan: Plan, dist=None) -> dict:
    """Stage -> estimated seconds of its remaining work on this machine, from a short measured step.

    Under torchrun (``dist``) every rank measures on its own device, at once: none waits minutes in a
    collective for rank 0's timing."""
    from rslad_fast import train as train_cli
    from rslad_fast.engine import estimate

    est, seen = {}, {}
    for s in plan.stages:
        if s.kind == "train":
            done, _ = completed_epochs(s.run_dir)
            cfg = train_cli.resolve_config(s.args)
            if done >= cfg.epochs:
                continue
            small = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, MEASURE_BATCH))
            device = dist.device(cfg.device) if dist is not None else None
            per_batch = estimate.measure_train_step(small, device=device) * cfg.batch_size / small.batch_size
            world = dist.world_size if dist is not None else 1
            batches = estimate.batches_per_epoch(cfg.train_n or TRAIN_IMAGES, cfg.batch_size, world)
            eval_s = estimate.measure_eval_seconds(cfg, images=math.ceil(cfg.eval_n / world), device=device)
            est[s.name, s.kind] = estimate.estimate_run(cfg, per_batch, batches, cfg.epochs - done, eval_seconds=eval_s)
            seen[s.name] = cfg
        elif not eval_done(plan, s.run_dir):
            cfg = seen.get(s.name) or train_cli.resolve_config(next(t.args for t in plan.stages if t.name == s.name))
            n = min(plan.opts.n, 10000)
            one = estimate.eval_attack_seconds(
                cfg.student,
                plan.opts.attacks,
                n,
                dist.device(cfg.device) if dist is not None else cfg.device,
                min(plan.opts.eval_batch_size, MEASURE_BATCH),  # timed small and scaled, as training's step
                num_classes=cfg.num_classes,
                **_accuracies(s.run_dir),
            )
            est[s.name, s.kind] = 2 * one  # best.pt and last.pt (once when they hold the same weights)
    return est


def _accuracies(run_dir: Path) -> dict:
    """A trained run's last held-out clean and PGD-20 accuracy (fractions), which size AutoAttack's work: its
    APGD-CE runs on the correctly classified points, its later attacks on those still robust; {} (the
    estimate's defaults) before the run has an epoch."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        return {"clean": float(last["clean_acc"]), "robust": float(last["pgd20_acc"])}
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return {}


# ---- The table and the curves ------------------------------------------------------------------------------


def provenance(data_root: str, dataset: str, given: Optional[str]) -> dict:
    """Where the evaluation's test set comes from: the files' md5 against torchvision's record of the
    official release says whether it is the official one (a re-encoded copy, as ../shared/data's JPEG
    CIFAR-10, is not, and its accuracies land near, not on, published ones)."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(dataset)
    out = {"root": data_root, "dataset": dataset, "given": given}
    if cls is None:
        out["official"] = None
        return out
    folder = Path(data_root)
    if folder.name != cls.base_folder:
        folder = folder / cls.base_folder
    files = cls.train_list + cls.test_list
    mismatched = []
    for name, md5 in files:
        try:
            digest = hashlib.md5((folder / name).read_bytes()).hexdigest()
        except OSError:
            digest = None
        if digest != md5:
            mismatched.append(name)
    out["official"] = not mismatched
    out["differs"] = mismatched
    return out


def provenance_text(prov: dict) -> str:
    parts = [prov["given"]] if prov.get("given") else []
    if prov.get("official") is True:
        parts.append(f"{prov['dataset']} files identical (md5) to the official release")
    elif prov.get("official") is False:
        parts.append(
            f"not the official {prov['dataset']} files ({', '.join(prov['differs'])} differ from the official "
            f"release's md5)"
            + (
                ": e.g. a JPEG re-encoded copy, whose accuracies land near, not on, published figures"
                if prov["dataset"] == "cifar10"
                else ""
            )
        )
    return "; ".join(parts) + f" ({prov['root']})"


def dataset_of(plan: Plan) -> str:
    return getattr(plan.rest, "dataset", None) or "cifar10"


def collect(plan: Plan) -> list:
    """The table's rows: one per (run, checkpoint) with ours, the paper's and the difference per column (the
    paper's CIFAR-10 figures, so on CIFAR-10 only)."""
    rows = []
    figures = PAPER if dataset_of(plan) == "cifar10" else {}
    for s in plan.stages:
        if s.kind != "evaluate":
            continue
        report = json.loads((s.run_dir / "eval.json").read_text())
        for r in report["rows"]:
            paper = figures.get((s.student, s.method), {}) if r["label"] == "last" else {}
            cols = {}
            for c in report["columns"]:
                ours = r["accuracy"][c]
                theirs = paper.get(c)
                cols[c] = {"ours": ours, "paper": theirs, "diff": None if theirs is None else ours - theirs}
            rows.append(
                {
                    "model": MODEL_NAMES.get(s.student, s.student),
                    "student": s.student,
                    "method": METHOD_NAMES.get(s.method, s.method),
                    "checkpoint": r["label"],
                    "n": report["n"],
                    "columns": cols,
                    "warnings": r.get("warnings", []),
                    "run": str(s.run_dir),
                }
            )
    return rows


def _cell(c: dict) -> str:
    if c["paper"] is None:
        return f"{c['ours']:.2f}"
    return f"{c['ours']:.2f} ({c['paper']:.2f}, {c['diff']:+.2f})"


def write_table(plan: Plan, rows: list, prov: dict) -> list:
    from rslad_fast.engine.checkpoint import atomic_write_bytes
    from rslad_fast.evaluation.robustness import COLUMNS

    columns = list(plan.opts.attacks)
    ns = sorted({r["n"] for r in rows})
    head = ["model", "method", "checkpoint"] + [COLUMNS[c] for c in columns]
    md = [
        f"# Table 2, reproduced ({dataset_of(plan)}, {plan.opts.preset} preset)",
        "",
        "Each cell: ours (the paper's, ours - paper). The paper's figures (Zi et al., ICCV 2021, Table 2, as "
        "../shared/METHODS.md transcribes them) are CIFAR-10's, of the last checkpoint: only CIFAR-10's `last` "
        "rows have them.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["model"], r["method"], r["checkpoint"]] + [_cell(r["columns"][c]) for c in columns]
        md.append("| " + " | ".join(cells) + " |")
    md += [
        "",
        f"- Test images: {', '.join(map(str, ns))} (the first N of the test set).",
        f"- Data: {provenance_text(prov)}.",
        f"- Preset: {plan.opts.preset}; train flags: {json.dumps(plan.settings['train_flags'])}; "
        f"evaluate flags: {' '.join(plan.eval_argv)}.",
        f"- Runs: {', '.join(dict.fromkeys(r['run'] for r in rows))} (each holds config.json, metrics.jsonl, "
        "eval.json).",
    ]
    for r in rows:
        md += [f"- WARNING {r['method']} {r['model']} {r['checkpoint']}: {w}" for w in r["warnings"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["model", "method", "checkpoint", "n"] + [f"{c}_{k}" for c in columns for k in ("ours", "paper", "diff")]
    )
    for r in rows:
        vals = [r["columns"][c][k] for c in columns for k in ("ours", "paper", "diff")]
        w.writerow([r["model"], r["method"], r["checkpoint"], r["n"]] + ["" if v is None else f"{v:.4f}" for v in vals])
    doc = {"columns": {c: COLUMNS[c] for c in columns}, "rows": rows, "data": prov, "plan": plan.settings}
    paths = [plan.out / "table2.md", plan.out / "table2.csv", plan.out / "table2.json"]
    for path, text in zip(paths, ("\n".join(md) + "\n", buf.getvalue(), json.dumps(doc, indent=2) + "\n")):
        atomic_write_bytes(path, text.encode())
    return paths


def write_curves(plan: Plan) -> list:
    """Per student, ``curves-<student>.png``: every method's clean and PGD-20 accuracy and training loss per
    epoch on the held-out subset the runs evaluate after each epoch (the paper's Figs. 2 and 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from rslad_fast.engine.checkpoint import atomic_write_bytes

    paths = []
    for student in plan.opts.students:
        fig = Figure(figsize=(15, 4.2))
        axes = fig.subplots(1, 3)
        for s in plan.stages:
            if s.kind != "train" or s.student != student or s.name == TEACHER_DIR:
                continue
            recs = [json.loads(line) for line in (s.run_dir / "metrics.jsonl").read_text().splitlines() if line]
            ep = [r["epoch"] for r in recs]
            label = METHOD_NAMES.get(s.method, s.method)
            axes[0].plot(ep, [100 * r["clean_acc"] for r in recs], marker="o", label=label)
            axes[1].plot(ep, [100 * r["pgd20_acc"] for r in recs], marker="o", label=label)
            axes[2].plot(ep, [r["train_loss"] for r in recs], marker="o", label=label)
        for ax, title in zip(axes, ("clean accuracy (%)", "PGD-20 accuracy (%)", "training loss (each method's own)")):
            ax.set_title(f"{MODEL_NAMES.get(student, student)}: {title}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        path = plan.out / f"curves-{student}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


# ---- The sweep ---------------------------------------------------------------------------------------------


def print_plan(plan: Plan, est: dict) -> None:
    from rslad_fast import train as train_cli
    from rslad_fast.engine.estimate import fmt_duration

    print(f"plan for {plan.out} ({plan.opts.preset} preset):")
    for i, s in enumerate(plan.stages, 1):
        if s.kind == "train":
            cfg = train_cli.resolve_config(s.args)
            done, _ = completed_epochs(s.run_dir)
            batches = math.ceil((cfg.train_n or TRAIN_IMAGES) / cfg.batch_size)
            state = {"done": "finished", "resume": f"resume at epoch {done + 1}", "new": "new"}[train_state(s)]
            what = f"train {cfg.method} {cfg.student}: {cfg.epochs} epochs x {batches} batches of {cfg.batch_size}" + (
                f", teacher {cfg.teacher['arch']}" if cfg.teacher else ""
            )
        else:
            state = "finished" if eval_done(plan, s.run_dir) else "to do"
            what = f"evaluate best.pt, last.pt: {','.join(plan.opts.attacks)}"
        cost = est.get((s.name, s.kind))
        print(f"  {i:2d}. {s.name:<18} {what} [{state}]" + (f" ~{fmt_duration(cost)}" if cost else ""))
    total = sum(est.values())
    epochs = sum(train_cli.resolve_config(s.args).epochs for s in plan.stages if s.kind == "train")
    print(
        f"{sum(s.kind == 'train' for s in plan.stages)} training runs ({epochs} epochs), "
        f"{sum(s.kind == 'evaluate' for s in plan.stages)} evaluations; remaining work: "
        + (
            f"about {fmt_duration(total)} on this machine (each step timed once here, at most at batch "
            f"{MEASURE_BATCH}, scaled)"
            if est
            else "none, every stage is finished"
        )
    )


def main(argv=None) -> int:
    from rslad_fast import train as train_cli

    opts, rest = build_parser().parse_known_args(argv)
    with train_cli.sigterm_as_interrupt():
        return torchrun_main(lambda dist: _main(opts, rest, dist))


def _main(opts, rest, dist) -> int:
    try:
        plan = agreed(dist, lambda: make_plan(opts, rest))
        if opts.dry_run:
            if dist.is_main:
                check_plan_file(plan)
                print_plan(plan, estimate_stages(plan))
            return 0
        agreed(dist, lambda: check_plan_file(plan))
        agreed(dist, lambda: write_plan(plan) if dist.is_main else None)
        dist.barrier()
        return _sweep(plan, dist)
    except UserError as e:
        if dist.is_main:
            print_error(e)
        return 2
    except KeyboardInterrupt:
        if dist.is_main:
            print("\ninterrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def _say(dist, msg: str) -> None:
    if dist.is_main:
        print(f"[reproduce] {msg}", flush=True)


def _sweep(plan: Plan, dist) -> int:
    from rslad_fast import evaluate as evaluate_cli
    from rslad_fast import train as train_cli
    from rslad_fast.engine.estimate import fmt_duration

    est = estimate_stages(plan, dist)
    _say(dist, f"{len(plan.stages)} stages; remaining work about {fmt_duration(sum(est.values()))} on this machine")
    t_start, spent, spent_est = time.perf_counter(), 0.0, 0.0
    eparser = evaluate_cli.build_parser()
    for i, s in enumerate(plan.stages, 1):
        head = f"{i}/{len(plan.stages)} {s.kind} {s.name}"
        t0 = time.perf_counter()
        if s.kind == "train":
            state = train_state(s)
            if state == "done":
                _say(dist, f"{head}: finished before, skipped")
                continue
            if state == "resume":
                args = plan.train_parser.parse_args(
                    ["--resume", str(s.run_dir)] + (["--no-download"] if plan.rest.no_download else [])
                )
            else:
                args = s.args
            args.no_progress = plan.opts.no_progress
            _say(dist, f"{head}: {'resuming' if state == 'resume' else 'starting'} {s.run_dir}")
            status = train_cli.run_parsed(plan.train_parser, args, dist)
        else:
            if eval_done(plan, s.run_dir):
                _say(dist, f"{head}: finished before, skipped")
                continue
            eargv = ["--run", str(s.run_dir)] + plan.eval_argv + (["--no-progress"] if plan.opts.no_progress else [])
            _say(dist, f"{head}: python -m rslad_fast.evaluate {' '.join(eargv)}")
            status = evaluate_cli._main(eparser.parse_args(eargv), eargv, dist)
        if status != 0:
            _say(dist, f"{head} stopped with status {status}; rerun the same command to continue from there")
            return status
        took = time.perf_counter() - t0
        spent += took
        spent_est += est.pop((s.name, s.kind), 0.0)
        left = sum(est.values()) * (spent / spent_est if spent_est > 0 else 1.0)  # scaled by how estimates fared
        _say(dist, f"{head}: done in {fmt_duration(took)}; remaining about {fmt_duration(left)}")
    if dist.is_main:
        rows = collect(plan)
        prov = provenance(plan.rest.data, dataset_of(plan), plan.opts.data_provenance)
        try:
            paths = write_table(plan, rows, prov) + write_curves(plan)
        except OSError as e:
            raise UserError(f"--out {plan.out}: {e.strerror or e}") from None
        print(Path(paths[0]).read_text())
        _say(dist, f"all done in {fmt_duration(time.perf_counter() - t_start)}: {', '.join(map(str, paths))}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process

    exit_process(main())
