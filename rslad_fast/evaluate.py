"""Robustness evaluation: the paper's Table 2 row for each checkpoint. This module is the command line (flags,
what to evaluate, printing); the evaluation of a model is ``evaluation/robustness.py``, the report
``evaluation/report.py``, the attacks and their registry ``attacks/eval_attacks.py``.

    python -m rslad_fast.evaluate --run RUN_DIR                     # RUN_DIR/best.pt and RUN_DIR/last.pt
    python -m rslad_fast.evaluate --ckpt model_cifar_wrn.pt --arch wrn34-10
    python -m rslad_fast.evaluate --run RUN_DIR --attacks clean,fgsm,pgd20-sat --n 1000 --sanity
    python -m rslad_fast.evaluate --ckpt cifar100_linf_wrn70-16_without.pt --arch wrn70-16 --dataset cifar100

The data set (--dataset cifar10 or cifar100; with --run, the run's, from its config.json) gives the test set
and every model's class count; with --run the data folder is the run's too (--data to look elsewhere).
Columns (its test set, first --n images, eps 8/255 for every attack unless --eps; the attacks are the same
on both data sets: CW's margin is over all the classes, AutoAttack's targeted attacks
take the standard version's 9 target classes):
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

from rslad_fast.attacks.eval_attacks import INIT_STD
from rslad_fast.attacks.pgd import STARTS
from rslad_fast.attacks.registry import EVAL_ATTACKS
from rslad_fast.cli import Parser, attack_list, fmt_value, fraction, integer, nonneg, print_error, torchrun_main
from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.errors import UserError
from rslad_fast.evaluation import report as eval_report
from rslad_fast.evaluation.report import WORST_LABEL, table
from rslad_fast.evaluation.robustness import ATTACKS
from rslad_fast.evaluation.run import evaluate
from rslad_fast.evaluation.settings import DefaultN, EvalSettings, flag_dest
from rslad_fast.models import ARCHS, WRN70_NORMS


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
        help="a training run: evaluates RUN_DIR/best.pt and RUN_DIR/last.pt (those present; a PeerAiD run's "
        "swa_best.pt and swa_last.pt too), "
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
        type=attack_list,
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
        "--data",
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: with --run the folder the run "
        "trained from, its config.json's data; else ./data)",
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
                dest=flag_dest(e, hp),
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


def settings_from_args(args) -> EvalSettings:
    return EvalSettings.from_dict(vars(args))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return torchrun_main(lambda dist: _main(args, argv, dist))


def _main(args, argv, dist) -> int:
    try:
        report = evaluate(settings_from_args(args), dist=dist, argv=argv)
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
