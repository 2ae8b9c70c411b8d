"""Robustness evaluation: the paper's Table 2 row for each checkpoint. This module is the command line (flags,
what to evaluate, printing); the evaluation of a model is ``evaluation/robustness.py``, the report
``evaluation/report.py``, the attacks and their registry ``attacks/eval_attacks.py``.

    python -m rslad_fast.evaluate --run RUN_DIR                     # RUN_DIR/best.pt and RUN_DIR/last.pt
    python -m rslad_fast.evaluate --ckpt model_cifar_wrn.pt --arch wrn34-10
    python -m rslad_fast.evaluate --run RUN_DIR --attacks clean,fgsm,pgd20-sat --n 1000 --sanity
    python -m rslad_fast.evaluate --ckpt cifar100_linf_wrn70-16_without.pt --arch wrn70-16 --dataset cifar100

The data set (--dataset cifar10 or cifar100; with --run, the run's, from its config.json) gives the test set
and every model's class count. Columns (its test set, first --n images, eps 8/255 for every attack unless
--eps; the attacks are the same on both data sets: CW's margin is over all the classes, AutoAttack's
targeted attacks take the standard version's 9 target classes):
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
import math
import sys
import time
from pathlib import Path

import torch

from rslad_fast.attacks.eval_attacks import EVAL_ATTACKS, INIT_STD, PGD
from rslad_fast.attacks.pgd import STARTS
from rslad_fast.cli import Parser, agreed, fmt_value, fraction, integer, nonneg, print_error, torchrun_main
from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.engine.config import check_ops_device, read_config_file, resolve_device
from rslad_fast.engine.runner import BEST, CONFIG, LAST
from rslad_fast.errors import UserError
from rslad_fast.evaluation import report as eval_report
from rslad_fast.evaluation.report import WORST_LABEL, table
from rslad_fast.evaluation.robustness import ATTACKS, evaluate_model, fingerprint, sanity_check, summarize
from rslad_fast.models import ARCHS, WRN70_NORMS, canonical_name

RUN_CHECKPOINTS = (BEST, LAST)


def _attack_list(text: str):
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no attack given")
    unknown = [n for n in names if n not in EVAL_ATTACKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown attack(s) {', '.join(map(repr, unknown))}; choose from {','.join(ATTACKS)}"
        )
    return [a for a in ATTACKS if a in names]  # the table's order, duplicates dropped


class DefaultN(int):
    """--n's default, told apart from the same number given on the command line (see the --n rule)."""


def _flag_dest(entry, hparam: str) -> str:
    return f"{entry.flag_prefix}_{hparam}".replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    # how an attack's own hyperparameter is parsed, and what --help calls it
    hparam_flags = {
        "steps": ({"type": integer(0)}, "steps"),
        "alpha": ({"type": nonneg}, "step size"),
        "kappa": ({"type": nonneg}, "confidence kappa"),
        "start": ({"choices": STARTS}, "start"),
    }
    p = Parser(
        prog="python -m rslad_fast.evaluate",
        description="Robustness evaluation of CIFAR-10 / CIFAR-100 checkpoints: the RSLAD paper's Table 2 row "
        "(Clean, FGSM, PGD_SAT, PGD_TRADES, CW-inf, AutoAttack) per checkpoint.",
    )
    src = p.add_argument_group("what to evaluate (one of)")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="a training run: evaluates RUN_DIR/best.pt and RUN_DIR/last.pt (those present), "
        "architecture from RUN_DIR/config.json key 'student' (under torchrun: --run-dir)",
    )
    # --run-dir and --n-images: the same flags under torchrun, whose own parser takes --run and --n for
    # abbreviations of its --run-path and --nnodes/--nproc-per-node/... and stops with "ambiguous option"
    what.add_argument("--run-dir", dest="run", metavar="RUN_DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    what.add_argument(
        "--ckpt",
        metavar="PATH",
        help="one checkpoint file (needs --arch), e.g. TRADES' model_cifar_wrn.pt with --arch wrn34-10",
    )
    src.add_argument(
        "--arch", help=f"architecture of --ckpt ({', '.join(ARCHS)}); with --run it must agree with config.json"
    )

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--attacks",
        type=_attack_list,
        default=list(ATTACKS),
        help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)",
    )
    g.add_argument(
        "--n",
        type=integer(1),
        default=DefaultN(10000),
        help="evaluate the first N test images (default 10000, or the whole test set when it is "
        "smaller; an explicit N larger than the test set is an error; under torchrun: --n-images)",
    )
    g.add_argument("--n-images", dest="n", type=integer(1), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument(
        "--batch-size",
        type=integer(1),
        default=250,
        help="images per batch, for every attack (default 250, AutoAttack's default)",
    )
    g.add_argument("--device", default=None, help="auto (default: cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=integer(0), default=0, help="seed of every random start and of AutoAttack")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        help="cifar10 or cifar100: the test set and the models' class count (default: with --run the run's, "
        "from config.json; else cifar10)",
    )
    g.add_argument(
        "--data", default="./data", help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default ./data)"
    )
    g.add_argument("--no-download", action="store_true", help="never try to download the data set")
    g.add_argument(
        "--wrn70-16-norm",
        choices=WRN70_NORMS,
        help="the mean/std a WRN-70-16 normalizes its input with (default: with --run the run's; else "
        "cifar10, as the official RSLAD code; cifar100: DeepMind's constants for its CIFAR-100 models)",
    )
    g.add_argument(
        "--eps",
        type=fraction,
        default=8 / 255,
        help="l_inf radius of every attack, in [0, 1]; fractions like 8/255 accepted (default 8/255)",
    )
    g.add_argument("--out", help="folder for eval.json and eval.md (default: the run dir, or the checkpoint's folder)")
    g.add_argument(
        "--tolerance",
        type=nonneg,
        default=0.5,
        help="accuracy points by which Clean >= FGSM >= PGD >= AA may be broken before it is flagged (default 0.5)",
    )
    g.add_argument(
        "--allow-tf32",
        action="store_true",
        help="allow TF32 convolutions/matmuls on CUDA (default: strict fp32, as training's default; "
        "recorded in eval.json)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true", help="print AutoAttack's progress lines")

    a = p.add_argument_group("attack hyperparameters (defaults: the official evaluation codes)")
    for e in EVAL_ATTACKS.values():
        for hp in e.flags:
            kind, what = hparam_flags[hp]
            a.add_argument(
                f"--{e.flag_prefix}-{hp}",
                dest=_flag_dest(e, hp),
                default=e.default(hp),
                **kind,
                help=f"{e.column} {what} ({fmt_value(e.default(hp))}; {e.source})",
            )
    a.add_argument(
        "--init-std",
        type=nonneg,
        default=INIT_STD,
        help=f"std of a 'normal' start, x + init_std*N(0,1) ({fmt_value(INIT_STD)}, TRADES/RSLAD)",
    )

    s = p.add_argument_group("sanity check")
    s.add_argument(
        "--sanity",
        action="store_true",
        help="also run PGD with a huge eps, which must leave accuracy at or below chance",
    )
    s.add_argument("--sanity-eps", type=fraction, default=1.0, help="its eps (1.0)")
    s.add_argument("--sanity-alpha", type=nonneg, default=0.1, help="its step size (0.1)")
    s.add_argument("--sanity-steps", type=integer(1), default=20, help="its steps (20)")
    return p


# ----------------------------------------------------------------------------- plan: validate, no work yet


def _run_setting(config: dict, cfg_path: Path, key: str, flag: str, given, choices) -> str:
    """A setting of the run (config.json's ``key``; "cifar10" where absent: runs written before it existed
    trained CIFAR-10 models) that the flag ``flag`` (``given``, None: not given) may only repeat."""
    value = config.get(key, "cifar10")
    if value not in choices:
        raise UserError(f"{cfg_path}: {key} {value!r} is not one of {', '.join(choices)}")
    if given is not None and given != value:
        raise UserError(f"{flag} {given} disagrees with {cfg_path}, which says {key} {value!r}")
    return value


def _read_run(run_dir: Path, arch_flag, dataset_flag=None, norm_flag=None):
    """A training run's checkpoints (rows of the table), its data set and WRN-70-16 normalization, and notes
    on the checkpoints missing; only the keys of config.json that name the architecture, method, data set and
    normalization are read, so older or partial runs still evaluate."""
    if not run_dir.exists():
        raise UserError(f"run dir {run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir}: not a directory")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise UserError(
            f"run dir {run_dir}: no {CONFIG} (the training run's resolved config); pass the "
            f"checkpoint with --ckpt PATH --arch NAME instead"
        )
    config = read_config_file(cfg_path)
    if not isinstance(config.get("student"), str):
        raise UserError(f"{cfg_path}: no 'student' architecture name in it")
    arch = canonical_name(config["student"])
    if arch_flag is not None and canonical_name(arch_flag) != arch:
        raise UserError(f"--arch {arch_flag} disagrees with {cfg_path}, which says student {config['student']!r}")
    ckpts = [run_dir / name for name in RUN_CHECKPOINTS if (run_dir / name).is_file()]
    if not ckpts:
        raise UserError(f"run dir {run_dir}: no checkpoint ({' or '.join(RUN_CHECKPOINTS)}) in it")
    method = config.get("method") if isinstance(config.get("method"), str) else None
    dataset = _run_setting(config, cfg_path, "dataset", "--dataset", dataset_flag, DATASETS)
    norm = _run_setting(config, cfg_path, "wrn70_16_norm", "--wrn70-16-norm", norm_flag, WRN70_NORMS)
    notes = [
        f"{name} not in {run_dir}; evaluated {', '.join(p.name for p in ckpts)} only"
        for name in RUN_CHECKPOINTS
        if not (run_dir / name).is_file()
    ]
    rows = [{"label": p.stem, "path": p, "arch": arch, "method": method} for p in ckpts]
    return rows, notes, dataset, norm


def make_plan(args) -> dict:
    """What to evaluate and where the report goes, validated; UserError before any work or file written."""
    if args.run is not None:
        rows, notes, dataset, norm = _read_run(Path(args.run), args.arch, args.dataset, args.wrn70_16_norm)
        out = Path(args.out) if args.out else Path(args.run)
    else:
        if args.arch is None:
            raise UserError(f"--ckpt needs --arch ({', '.join(ARCHS)})")
        arch = canonical_name(args.arch)
        ckpt = Path(args.ckpt)
        if not ckpt.exists():
            raise UserError(f"checkpoint {ckpt}: no such file")
        if not ckpt.is_file():
            raise UserError(f"checkpoint {ckpt}: not a file")
        rows, notes = [{"label": ckpt.name, "path": ckpt, "arch": arch, "method": None}], []
        dataset, norm = args.dataset or "cifar10", args.wrn70_16_norm or "cifar10"
        out = Path(args.out) if args.out else ckpt.parent
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    return {"rows": rows, "out": out, "notes": notes, "dataset": dataset, "wrn70_16_norm": norm}


def build_attacks(args, log=None) -> dict:
    """name -> attack object for the names in --attacks, with the flags' hyperparameters."""
    settings = {
        "eps": args.eps,
        "init_std": args.init_std,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "log": log,
        "verbose": args.verbose,
    }
    made = {}
    for name in args.attacks:
        e = EVAL_ATTACKS[name]
        own = {hp: getattr(args, _flag_dest(e, hp)) for hp in e.flags}
        # AutoAttack: a UserError here if pyautoattack is missing, before any work
        made[name] = e.make(**own, **{k: settings[k] for k in e.takes})
    return made


def _device(name):
    """--device (None: cuda if available) for the evaluation, on which the compiled ops must run: one error
    line now (a library built without CUDA kernels, say) instead of a traceback from the first attack."""
    device = resolve_device(name)
    check_ops_device(device)
    return torch.device(device)


def _load(args, log, dist):
    """Every check that can fail on user input, in order, before any attack runs: (plan, device, attacks,
    sanity attack, models, test images, labels)."""
    from rslad_fast.data import load_cifar, num_classes
    from rslad_fast.models import build
    from rslad_fast.models.loading import load_checkpoint_into

    plan = make_plan(args)
    device = dist.device(str(_device(args.device)))  # torchrun: cuda:LOCAL_RANK
    attacks = build_attacks(args, log=log)
    sanity = None
    if args.sanity:
        sanity = PGD(
            eps=args.sanity_eps, alpha=args.sanity_alpha, steps=args.sanity_steps, start="uniform", name="sanity"
        )
    # every checkpoint loads (or fails) before any attack runs
    classes, norm = num_classes(plan["dataset"]), plan["wrn70_16_norm"]
    models = [
        load_checkpoint_into(build(row["arch"], classes, normalization=norm), row["path"], row["arch"]).eval()
        for row in plan["rows"]
    ]
    images, labels = load_cifar(
        args.data, train=False, dataset=plan["dataset"], download=False if args.no_download else "auto"
    )
    # the rule shared with train's --eval-n: the default shrinks to a smaller test set (and says so), a
    # value the user gave must fit
    if args.n > len(labels):
        if not isinstance(args.n, DefaultN):
            raise UserError(f"--n {args.n} exceeds the {len(labels)} test images in {args.data}")
        plan["notes"].append(
            f"the test set in {args.data} holds {len(labels)} images, fewer than the default "
            f"--n {args.n}: the whole test set is evaluated"
        )
    return plan, device, attacks, sanity, models, images, labels


def run(args, argv=None, dist=None) -> dict:
    """Validate, load, evaluate; returns the report (not yet written).

    ``dist`` (``engine.dist.Dist``, torchrun): every rank runs this; the checks are agreed on (all ranks
    fail together), then each rank evaluates its slice (see :func:`evaluate_model`)."""
    from tqdm import tqdm

    from rslad_fast.engine.dist import Dist
    from rslad_fast.engine.precision import restore_tf32, set_tf32

    dist = Dist() if dist is None else dist
    bar_holder = {}

    def log(line):
        bar = bar_holder.get("bar")
        (bar.write if bar is not None else print)(line, file=sys.stderr)

    plan, device, attacks, sanity, models, images, labels = agreed(dist, lambda: _load(args, log, dist))
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
        with tqdm(
            total=per_model * len(models),
            unit="batch",
            file=sys.stderr,
            disable=args.no_progress or not dist.is_main,
            dynamic_ncols=True,
        ) as bar:
            bar_holder["bar"] = bar
            done = {}  # weights fingerprint -> (label, results): best.pt is often last.pt, attacked once
            for row, model in zip(plan["rows"], models):
                key = fingerprint(model)
                if key in done:
                    first, res = done[key]
                    plan["notes"].append(f"{row['label']} holds the same weights as {first}: evaluated once")
                    bar.update(per_model)
                else:
                    res = evaluate_model(
                        model,
                        images,
                        labels,
                        attacks,
                        batch_size=args.batch_size,
                        device=device,
                        seed=args.seed,
                        bar=bar,
                        sanity=sanity,
                        label=row["label"],
                        dist=dist,
                    )
                    done[key] = (row["label"], res)
                entry = {
                    "label": row["label"],
                    "checkpoint": str(row["path"]),
                    "arch": row["arch"],
                    "method": row["method"],
                    **summarize(res, attacks, args.tolerance),
                }
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

    return eval_report.build(
        args=args,
        argv=argv,
        attacks=attacks,
        sanity=sanity,
        rows=rows,
        n=n,
        device=device,
        world_size=dist.world_size,
        started=started,
        seconds=time.perf_counter() - t0,
        out=plan["out"],
        notes=plan["notes"],
        dataset=plan["dataset"],
        wrn70_16_norm=plan["wrn70_16_norm"],
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return torchrun_main(lambda dist: _main(args, argv, dist))


def _main(args, argv, dist) -> int:
    try:
        report = run(args, argv, dist)
        if not dist.is_main:  # rank 0 alone writes and prints
            return 0
        json_path, md_path = eval_report.write(report)
    except UserError as e:
        if dist.is_main:  # under torchrun the ranks agreed on it: rank 0 says it
            print_error(e)
        return 2
    except KeyboardInterrupt:
        if dist.is_main:
            print_error("interrupted, nothing written")
        return 130
    print(table(report["rows"], report["columns"]))
    print(f"{WORST_LABEL}: per image, correct under clean and every attack that ran.")
    for r in report["rows"]:
        for w in r["warnings"]:
            print(f"WARNING {r['label']}: {w}")
        if "sanity" in r:
            s = r["sanity"]
            print(
                f"sanity {r['label']}: PGD eps {s['eps']:g} -> {s['accuracy']:.2f}% "
                f"({'ok' if s['ok'] else 'ABOVE CHANCE'}, chance {s['chance']:.2f}%)"
            )
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process

    exit_process(main())  # torchrun: see exit_process
