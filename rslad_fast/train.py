"""Train a robust CIFAR-10 or CIFAR-100 model: ``python -m rslad_fast.train``.

    # the README's first command: a CPU-sized RSLAD run (trains its own TRADES teacher first), minutes
    python -m rslad_fast.train --preset quick --student mnv2 --data ./data --out runs/quick

    # the paper: RSLAD ResNet-18 from TRADES' WRN-34-10 (model_cifar_wrn.pt), the official schedule
    python -m rslad_fast.train --method rslad --student resnet18 --teacher model_cifar_wrn.pt --out runs/rslad_rn18

    # a teacher of your own (TRADES WRN-34-10), then any other method
    python -m rslad_fast.train --method trades --student wrn34-10 --out runs/trades_wrn
    python -m rslad_fast.train --method ard --student mnv2 --teacher runs/trades_wrn/last.pt --out runs/ard_mnv2

    # continue a run killed at any moment (bitwise the same result on the CPU)
    python -m rslad_fast.train --resume runs/rslad_rn18

    # 4 GPUs of one node (DDP): --batch-size is per process, 4 x 32 = the paper's global 128; lr as given
    torchrun --nproc_per_node=4 -m rslad_fast.train --student resnet18 --teacher model_cifar_wrn.pt \
        --batch-size 32 --out runs/rslad_rn18_ddp

Data: ``--data DIR`` is the folder holding ``cifar-10-batches-py/`` or, with ``--dataset cifar100``,
``cifar-100-python/`` (default ``./data``; README "Data sets"). On these machines prepare CIFAR-10 from the
shared JPEG copy with ``python ../shared/data/prepare_cifar10.py ./data``; elsewhere a missing set is
downloaded when the host is reachable.

What a run writes (see rslad_fast/engine/rundir.py): config.json, metrics.jsonl, curves.png, last.pt,
best.pt and, for a distillation method without --teacher, the teacher's own run in teacher/.

Multi-process (torchrun, DDP; README "Multi-GPU and multi-node"): --batch-size is per process, so the global
batch is --batch-size x WORLD_SIZE; the lr is used as given at every world size, not scaled. Only rank 0
writes; --resume works with another number of processes (not bitwise then).

Every setting resolves as: the command line, else the preset, else the method's official value (its
HPARAMS and SCHEDULE, cited in rslad_fast/methods/<method>.py). The presets' values are in
rslad_fast/engine/presets.py, each documented once, next to it; this file only turns the command line into
``engine.RunSettings`` and calls ``engine.train`` / ``engine.resume``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rslad_fast import engine
from rslad_fast.cli import Parser, print_error, sigterm_as_interrupt, stop_status, torchrun_main
from rslad_fast.engine import RunDir, resolve
from rslad_fast.engine.checkpoint import WriteError
from rslad_fast.engine.dist import agreed
from rslad_fast.engine.presets import EVAL_ATTACK, PRESETS  # noqa: F401  (re-exported: train.PRESETS)
from rslad_fast.errors import UserError
from rslad_fast.run_flags import add_run_flags, flag_of, settings_from_args

# options of the invocation, not settings of the run: with --resume (every setting from config.json) the only
# flags allowed
RUN_OPTIONS = ("resume", "no_download", "no_progress")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rslad_fast.train",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n" + __doc__.split("\n\n", 1)[1].split("\n\nData:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = add_run_flags(p)
    g = groups["data and output"].group
    g.add_argument(
        "--out", metavar="RUN_DIR", help="run directory (default runs/<method>-<student>-<preset>-seed<seed>)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last.pt, with its config.json (no other settings allowed)",
    )
    g.add_argument("--no-download", action="store_true", help="never try to download the data set")
    groups["execution"].group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_config(args: argparse.Namespace):
    """The validated Config of a new run (and of its self-trained teacher) from parsed arguments."""

    return resolve(settings_from_args(args))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_as_interrupt():
        return torchrun_main(lambda dist: _main(args, dist))


def _main(args, dist) -> int:
    """One run from parsed arguments in an already joined process group (``dist``). Returns the exit status."""

    run_dir = None
    download = False if args.no_download else "auto"
    progress = not args.no_progress

    def settings():  # checked on every rank, agreed on, so that rank 0 alone says what is wrong
        if not args.resume:
            return engine.resolve(settings_from_args(args))
        given = [flag_of(k) for k in settings_from_args(args).given()]
        given += [f for f, v in (("--out", args.out), ("--overwrite", args.overwrite)) if v]
        if given:
            raise UserError(f"--resume takes every setting from RUN_DIR/config.json; drop {', '.join(given)}")
        return None

    try:
        cfg = agreed(dist, settings)
        if cfg is None:
            run_dir = Path(args.resume)
            summary = engine.resume(run_dir, dist=dist, download=download, progress=progress)
        else:
            run_dir = Path(args.out or f"runs/{cfg.method}-{cfg.student}-{cfg.preset}-seed{cfg.seed}")
            summary = engine.train(
                cfg,
                run_dir,
                dist=dist,
                overwrite=args.overwrite,
                download=download,
                eval_n_given=args.eval_n is not None,
                progress=progress,
            )
    except WriteError as e:  # disk full, a folder turned read-only: rank 0's writes; torchrun stops the others
        print_error(f"{e}; once that is fixed, continue with: python -m rslad_fast.train --resume {run_dir}")
        return 2
    except UserError as e:
        # bad input (every rank agreed on it: rank 0 says it), or after the agreement a broken checkpoint or a
        # changed run directory, seen by the rank(s) reading it; torchrun stops the others
        if dist.is_main or not isinstance(e, engine.dist.Agreed):
            print_error(e)
        return 2
    except OSError as e:  # any other file-system failure (every checkpoint write is atomic: nothing is torn)
        print_error(
            f"{e.filename or run_dir}: {e.strerror or e}; once that is fixed, continue with: "
            f"python -m rslad_fast.train --resume {run_dir}"
        )
        return 2
    except engine.Diverged as e:  # the epoch's loss is all-reduced: every rank diverges together; one says it
        if dist.is_main:
            print_error(e)
        return 1
    except KeyboardInterrupt as e:
        what, status = stop_status(e)
        if dist.is_main:
            then = f"; continue with: python -m rslad_fast.train --resume {run_dir}" if _started(run_dir) else ""
            print(f"\n{what}{then}", file=sys.stderr)
        return status
    if dist.is_main and summary:
        print(
            f"done {run_dir}: clean {100 * summary.get('clean_acc', float('nan')):.2f}%, PGD-20 "
            f"{100 * summary.get('pgd20_acc', float('nan')):.2f}% on {summary.get('eval_n')} held-out test images "
            f"(best PGD-20 {100 * summary['best_acc']:.2f}%)"
        )
    return 0


def _started(run_dir) -> bool:
    """Whether an interrupted run has a run directory to continue (its config.json was written)."""

    return run_dir is not None and RunDir(run_dir).has_config()


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process

    exit_process(main())  # torchrun: see exit_process
