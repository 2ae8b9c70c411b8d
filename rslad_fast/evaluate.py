"""Robustness evaluation: the paper's Table 2 row for each checkpoint. This module is the command line (flags,
what to evaluate, printing); the evaluation of a model is ``evaluation/robustness.py``, the report
``evaluation/report.py``, the attacks and their registry ``attacks/eval_attacks.py``.

    python -m rslad_fast.evaluate --run RUN_DIR                     # RUN_DIR/best.pt and RUN_DIR/last.pt
    python -m rslad_fast.evaluate --ckpt model_cifar_wrn.pt --arch wrn34-10
    python -m rslad_fast.evaluate --run RUN_DIR --attacks clean,fgsm,pgd20-sat --n 1000 --sanity

Columns (CIFAR-10 test set, first --n images, eps 8/255 for every attack unless --eps):
    Clean, FGSM, PGD_SAT (pgd20-sat), PGD_TRADES (pgd20-trades), CW∞ (cw), AA (aa), and "worst": per image,
    correct on the clean image AND under every attack that ran.
The hyperparameters and their sources are in ``attacks/eval_attacks.py`` and ``attacks/autoattack.py``;
every one has a flag here with the same default.

Output: the table printed to stdout, ``eval.json`` (numbers, configuration, device, versions, n, seed,
timings, warnings) and ``eval.md`` (the table and the same facts, for people) in --out (default: the run
dir for --run, the checkpoint's folder for --ckpt). Warnings are flagged in both and printed: a row that
breaks Clean >= FGSM >= PGD >= AA beyond --tolerance, AutoAttack's own checks, and, with --sanity, an
eps = 1 attack that leaves accuracy above chance (a broken attack or gradient masking).

Under torchrun (``torchrun --nproc_per_node=N -m rslad_fast.evaluate --run-dir RUN_DIR --n-images 1000``: there
--run and --n must be spelled --run-dir and --n-images, torchrun's own parser mistakes the short forms for
abbreviations of its options) each process evaluates a contiguous
1/N of the images (``cuda:LOCAL_RANK`` on GPUs), the per-image results are gathered, and rank 0 prints and
writes the report. Clean and FGSM figures are those of one process; attacks with a random start draw it from
one stream per rank (rank 0's is the single process's), so their figures agree with it statistically.

Bad input (missing checkpoint, wrong architecture, unknown attack, bad numbers, missing data, a run dir
without checkpoints or config) prints one ``error: ...`` line on stderr and exits with status 2, having
written nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

from rslad_fast.attacks.eval_attacks import EVAL_ATTACKS, INIT_STD, PGD
from rslad_fast.attacks.pgd import STARTS
from rslad_fast.cli import fmt_value
from rslad_fast.errors import UserError
from rslad_fast.evaluation import report as eval_report
from rslad_fast.evaluation.report import WORST_LABEL, table
from rslad_fast.evaluation.robustness import ATTACKS, evaluate_model, fingerprint, sanity_check, summarize

RUN_CHECKPOINTS = ("best.pt", "last.pt")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives the one-line ``error: ...`` of every other bad input (status 2)."""

    def error(self, message):
        # under torchrun every process of a node parses the same command line: one of them says it
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("LOCAL_RANK", "0") == "0" else None)


def _number(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (a float or a fraction such as 8/255)")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (inputs are in [0, 1]), got {text}")
    return value


def _nonneg(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _attack_list(text: str):
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no attack given")
    unknown = [n for n in names if n not in EVAL_ATTACKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown attack(s) {', '.join(map(repr, unknown))}; choose from "
                                         f"{','.join(ATTACKS)}")
    return [a for a in ATTACKS if a in names]  # the table's order, duplicates dropped


class DefaultN(int):
    """--n's default, told apart from the same number given on the command line (see the --n rule)."""


def _flag_dest(entry, hparam: str) -> str:
    return f"{entry.flag_prefix}_{hparam}".replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    # how an attack's own hyperparameter is parsed, and what --help calls it
    hparam_flags = {"steps": ({"type": _int(0)}, "steps"), "alpha": ({"type": _nonneg}, "step size"),
                    "kappa": ({"type": _nonneg}, "confidence kappa"), "start": ({"choices": STARTS}, "start")}
    p = _Parser(prog="python -m rslad_fast.evaluate",
                description="Robustness evaluation of CIFAR-10 checkpoints: the RSLAD paper's Table 2 row "
                            "(Clean, FGSM, PGD_SAT, PGD_TRADES, CW-inf, AutoAttack) per checkpoint.")
    src = p.add_argument_group("what to evaluate (one of)")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="RUN_DIR",
                      help="a training run: evaluates RUN_DIR/best.pt and RUN_DIR/last.pt (those present), "
                           "architecture from RUN_DIR/config.json key 'student' (under torchrun: --run-dir)")
    # --run-dir and --n-images: the same flags under torchrun, whose own parser takes --run and --n for
    # abbreviations of its --run-path and --nnodes/--nproc-per-node/... and stops with "ambiguous option"
    what.add_argument("--run-dir", dest="run", metavar="RUN_DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    what.add_argument("--ckpt", metavar="PATH", help="one checkpoint file (needs --arch), e.g. TRADES' "
                                                     "model_cifar_wrn.pt with --arch wrn34-10")
    src.add_argument("--arch", help="architecture of --ckpt (resnet18, mnv2, wrn34-10, wrn70-16, tiny); with "
                                    "--run it must agree with config.json")

    g = p.add_argument_group("evaluation")
    g.add_argument("--attacks", type=_attack_list, default=list(ATTACKS),
                   help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)")
    g.add_argument("--n", type=_int(1), default=DefaultN(10000),
                   help="evaluate the first N test images (default 10000, or the whole test set when it is "
                        "smaller; an explicit N larger than the test set is an error; under torchrun: --n-images)")
    g.add_argument("--n-images", dest="n", type=_int(1), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--batch-size", type=_int(1), default=250,
                   help="images per batch, for every attack (default 250, AutoAttack's default)")
    g.add_argument("--device", default=None, help="cuda if available, else cpu")
    g.add_argument("--seed", type=_int(0), default=0, help="seed of every random start and of AutoAttack")
    g.add_argument("--data", default="./data", help="folder holding cifar-10-batches-py/ (default ./data)")
    g.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    g.add_argument("--eps", type=_fraction, default=8 / 255,
                   help="l_inf radius of every attack, in [0, 1]; fractions like 8/255 accepted (default 8/255)")
    g.add_argument("--out", help="folder for eval.json and eval.md (default: the run dir, or the checkpoint's "
                                 "folder)")
    g.add_argument("--tolerance", type=_nonneg, default=0.5,
                   help="accuracy points by which Clean >= FGSM >= PGD >= AA may be broken before it is "
                        "flagged (default 0.5)")
    g.add_argument("--allow-tf32", action="store_true",
                   help="allow TF32 convolutions/matmuls on CUDA (default: strict fp32, as training's default; "
                        "recorded in eval.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true", help="print AutoAttack's progress lines")

    a = p.add_argument_group("attack hyperparameters (defaults: the official evaluation codes)")
    for e in EVAL_ATTACKS.values():
        for hp in e.flags:
            kind, what = hparam_flags[hp]
            a.add_argument(f"--{e.flag_prefix}-{hp}", dest=_flag_dest(e, hp), default=e.default(hp), **kind,
                           help=f"{e.column} {what} ({fmt_value(e.default(hp))}; {e.source})")
    a.add_argument("--init-std", type=_nonneg, default=INIT_STD,
                   help=f"std of a 'normal' start, x + init_std*N(0,1) ({fmt_value(INIT_STD)}, TRADES/RSLAD)")

    s = p.add_argument_group("sanity check")
    s.add_argument("--sanity", action="store_true",
                   help="also run PGD with a huge eps, which must leave accuracy at or below chance")
    s.add_argument("--sanity-eps", type=_fraction, default=1.0, help="its eps (1.0)")
    s.add_argument("--sanity-alpha", type=_nonneg, default=0.1, help="its step size (0.1)")
    s.add_argument("--sanity-steps", type=_int(1), default=20, help="its steps (20)")
    return p


# ----------------------------------------------------------------------------- plan: validate, no work yet

def _read_run(run_dir: Path, arch_flag):
    if not run_dir.exists():
        raise UserError(f"run dir {run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir}: not a directory")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"run dir {run_dir}: no config.json (the training run's resolved config); pass the "
                        f"checkpoint with --ckpt PATH --arch NAME instead")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("student"), str):
        raise UserError(f"{cfg_path}: no 'student' architecture name in it")
    from rslad_fast.models import canonical_name
    arch = canonical_name(config["student"])
    if arch_flag is not None and canonical_name(arch_flag) != arch:
        raise UserError(f"--arch {arch_flag} disagrees with {cfg_path}, which says student {config['student']!r}")
    ckpts = [run_dir / name for name in RUN_CHECKPOINTS if (run_dir / name).is_file()]
    if not ckpts:
        raise UserError(f"run dir {run_dir}: no checkpoint ({' or '.join(RUN_CHECKPOINTS)}) in it")
    method = config.get("method") if isinstance(config.get("method"), str) else None
    notes = [f"{name} not in {run_dir}; evaluated {', '.join(p.name for p in ckpts)} only"
             for name in RUN_CHECKPOINTS if not (run_dir / name).is_file()]
    return [{"label": p.stem, "path": p, "arch": arch, "method": method} for p in ckpts], notes


def make_plan(args) -> dict:
    """Everything the run needs, validated; raises UserError before any work is done or file written."""
    from rslad_fast.models import canonical_name
    if args.run is not None:
        rows, notes = _read_run(Path(args.run), args.arch)
        out = Path(args.out) if args.out else Path(args.run)
    else:
        if args.arch is None:
            raise UserError("--ckpt needs --arch (resnet18, mnv2, wrn34-10, wrn70-16 or tiny)")
        arch = canonical_name(args.arch)
        ckpt = Path(args.ckpt)
        if not ckpt.exists():
            raise UserError(f"checkpoint {ckpt}: no such file")
        if not ckpt.is_file():
            raise UserError(f"checkpoint {ckpt}: not a file")
        rows, notes = [{"label": ckpt.name, "path": ckpt, "arch": arch, "method": None}], []
        out = Path(args.out) if args.out else ckpt.parent
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    return {"rows": rows, "out": out, "notes": notes}


def build_attacks(args, log=None) -> dict:
    """name -> attack object for the names in --attacks, with the flags' hyperparameters."""
    settings = {"eps": args.eps, "init_std": args.init_std, "seed": args.seed, "batch_size": args.batch_size,
                "log": log, "verbose": args.verbose}
    made = {}
    for name in args.attacks:
        e = EVAL_ATTACKS[name]
        own = {hp: getattr(args, _flag_dest(e, hp)) for hp in e.flags}
        # AutoAttack: a UserError here if pyautoattack is missing, before any work
        made[name] = e.make(**own, **{k: settings[k] for k in e.takes})
    return made


def _device(name):
    import torch

    from rslad_fast.engine.config import check_ops_device

    if name is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--device {name!r}: not a device ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device {name}: only cpu and cuda are supported")
    check_ops_device(dev)  # a library built without CUDA kernels: one line now, not a traceback later
    return dev


def run(args, argv=None, dist=None) -> dict:
    """Validate, load, evaluate; returns the report (not yet written).

    ``dist`` (``engine.dist.Dist``, torchrun): every rank runs this; the checks are agreed on (all ranks
    fail together), then each rank evaluates its slice (see :func:`evaluate_model`)."""
    import torch
    from tqdm import tqdm

    from rslad_fast.data import load_cifar10
    from rslad_fast.engine.dist import Dist
    from rslad_fast.engine.precision import restore_tf32, set_tf32
    from rslad_fast.models import build
    from rslad_fast.models.loading import load_checkpoint_into

    dist = Dist() if dist is None else dist
    bar_holder = {}

    def log(line):
        bar = bar_holder.get("bar")
        (bar.write if bar is not None else print)(line, file=sys.stderr)

    error = None
    try:
        plan = make_plan(args)
        device = dist.device(str(_device(args.device)))
        attacks = build_attacks(args, log=log)
        sanity = None
        if args.sanity:
            sanity = PGD(eps=args.sanity_eps, alpha=args.sanity_alpha, steps=args.sanity_steps, start="uniform",
                         name="sanity")

        models = []
        for row in plan["rows"]:  # every checkpoint loads (or fails) before any attack runs
            models.append(load_checkpoint_into(build(row["arch"]), row["path"], row["arch"]).eval())
        images, labels = load_cifar10(args.data, train=False, download=False if args.no_download else "auto")
        # the rule shared with train's --eval-n: the default shrinks to a smaller test set (and says so), a
        # value the user gave must fit
        if args.n > len(labels):
            if not isinstance(args.n, DefaultN):
                raise UserError(f"--n {args.n} exceeds the {len(labels)} test images in {args.data}")
            plan["notes"].append(f"the test set in {args.data} holds {len(labels)} images, fewer than the default "
                                 f"--n {args.n}: the whole test set is evaluated")
    except UserError as e:
        if not dist.active:
            raise
        error = str(e)
    error = dist.first_error(error)  # torchrun: all ranks stop together, none waits in a collective
    if error is not None:
        raise UserError(error)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    n = min(args.n, len(labels))
    images, labels = images[:n], labels[:n]

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    saved_tf32 = set_tf32(args.allow_tf32)  # the training engine's policy (engine/precision.py)
    lo, hi = dist.shard(n)
    n_batches = math.ceil((hi - lo) / args.batch_size)  # this rank's (the bar is rank 0's)
    per_model = (len(attacks) + ("clean" not in attacks) + (sanity is not None)) * n_batches
    rows = []
    try:
        with tqdm(total=per_model * len(models), unit="batch", file=sys.stderr,
                  disable=args.no_progress or not dist.is_main, dynamic_ncols=True) as bar:
            bar_holder["bar"] = bar
            done = {}  # weights fingerprint -> (label, results): best.pt is often last.pt, attacked once
            for row, model in zip(plan["rows"], models):
                key = fingerprint(model)
                if key in done:
                    first, res = done[key]
                    plan["notes"].append(f"{row['label']} holds the same weights as {first}: evaluated once")
                    bar.update(per_model)
                else:
                    res = evaluate_model(model, images, labels, attacks, batch_size=args.batch_size,
                                         device=device, seed=args.seed, bar=bar, sanity=sanity,
                                         label=row["label"], dist=dist)
                    done[key] = (row["label"], res)
                entry = {"label": row["label"], "checkpoint": str(row["path"]), "arch": row["arch"],
                         "method": row["method"], **summarize(res, attacks, args.tolerance)}
                if sanity is not None:
                    with torch.no_grad():
                        classes = model.eval()(images[:1].to(device).float().div(255)).shape[1]
                    entry["sanity"], warning = sanity_check(sanity, res["sanity"]["accuracy"], classes)
                    if warning:
                        entry["warnings"].append(warning)
                rows.append(entry)
    finally:
        restore_tf32(saved_tf32)
        bar_holder.pop("bar", None)

    return eval_report.build(args=args, argv=argv, attacks=attacks, sanity=sanity, rows=rows, n=n, device=device,
                             world_size=dist.world_size, started=started, seconds=time.perf_counter() - t0,
                             out=plan["out"], notes=plan["notes"])


def main(argv=None) -> int:
    from rslad_fast.engine.dist import Dist

    args = build_parser().parse_args(argv)
    try:
        dist = Dist.from_env()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.init()  # torchrun: join the process group (a single process: nothing)
    try:
        return _main(args, argv, dist)
    finally:
        dist.close()


def _main(args, argv, dist) -> int:
    try:
        report = run(args, argv, dist)
        if not dist.is_main:  # rank 0 alone writes and prints
            return 0
        json_path, md_path = eval_report.write(report)
    except UserError as e:
        if dist.is_main:  # under torchrun the ranks agreed on it: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if dist.is_main:
            print("error: interrupted, nothing written", file=sys.stderr)
        return 130
    print(table(report["rows"], report["columns"]))
    print(f"{WORST_LABEL}: per image, correct under clean and every attack that ran.")
    for r in report["rows"]:
        for w in r["warnings"]:
            print(f"WARNING {r['label']}: {w}")
        if "sanity" in r:
            s = r["sanity"]
            print(f"sanity {r['label']}: PGD eps {s['eps']:g} -> {s['accuracy']:.2f}% "
                  f"({'ok' if s['ok'] else 'ABOVE CHANCE'}, chance {s['chance']:.2f}%)")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process
    exit_process(main())  # torchrun: see exit_process
