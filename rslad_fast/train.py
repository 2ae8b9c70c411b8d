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

What a run writes (see rslad_fast/engine/runner.py): config.json, metrics.jsonl, curves.png, last.pt,
best.pt and, for a distillation method without --teacher, the teacher's own run in teacher/.

Multi-process (torchrun, DDP; README "Multi-GPU and multi-node"): --batch-size is per process, so the global
batch is --batch-size x WORLD_SIZE; the lr is used as given at every world size, not scaled. Only rank 0
writes; --resume works with another number of processes (not bitwise then).

Every setting resolves as: the command line, else the preset, else the method's official value (its
HPARAMS and SCHEDULE, cited in rslad_fast/methods/<method>.py). The values of this file are below, each
documented once, next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from rslad_fast.cli import Parser, agreed, fmt_value, milestones, number, print_error, torchrun_main
from rslad_fast.engine.config import Preset

# ---- 1. Evaluation after every epoch -------------------------------------------------------------------
# RSLAD's only evaluation (resnet18_rslad_cifar10.py, `attack_pgd` in rslad_loss.py): PGD-20 on CE, the
# model in eval mode, uniform start: the settings of evaluate's pgd20-trades. Run by the same evaluation attack,
# attacks.PGD, on the shared PGD engine; one difference: RSLAD clamps the uniform start to [0, 1] before the
# first gradient, the engine clamps after the first step (the first gradient is taken at most eps outside the
# image box; every later iterate is identical in form).
EVAL_ATTACK = dict(
    eps=8 / 255,  # l_inf radius, inputs in [0, 1]                     (RSLAD: epsilon=8.0/255.0)
    alpha=0.003,  # step size per iteration, same unit                 (RSLAD: step_size=0.003)
    steps=20,  # iterations                                         (RSLAD: attack_iters=20)
    start="uniform",  # x + U(-eps, eps)                                   (RSLAD: uniform_(-epsilon, epsilon))
)

# ---- 2. Presets ----------------------------------------------------------------------------------------
# paper: the chosen method's official settings, untouched (epochs, lr, milestones, momentum, weight decay,
#   batch size: Method.SCHEDULE; attack and loss: Method.HPARAMS). Only the per-epoch evaluation is ours:
#   RSLAD's loop evaluated the whole test set every 20 epochs (every epoch from 215); we evaluate a fixed
#   subset every epoch for the curves. Final numbers come from a separate full evaluation.
# quick: a CPU-sized run that shows the whole pipeline and robust accuracy clearly above the 10% of chance
#   on 2 cores in about 17 minutes (teacher and student): a training subset, few epochs, the
#   training attack cut to `attack_steps` PGD steps (step size scaled so that steps * step_size, the
#   distance the attack can travel, stays the official one: RSLAD 10 x 2/255 -> 1 x 20/255, then projected
#   to the 8/255 ball), the official lr decays collapsed into one x0.1 for the last epoch, IAD's warm-up
#   length scaled by epochs / official epochs, channels_last on, a small ResNet-8 as the self-trained
#   teacher, and for RSLAD the lr x 10 / weight decay / 10 that turns its per-logit mean into a per-image
#   one (see `per_image_loss_lr`). Evaluation stays PGD-20. Everything else (momentum, loss, eps, and the
#   lr and weight decay of every other method) is official.
PRESETS = {
    "paper": Preset(
        train_n=None,  # training images: None = all 50,000
        eval_n=1000,  # held-out test images (the first ones of the test set) evaluated per epoch
        eval_batch_size=500,  # images per evaluation batch (memory only; results do not depend on it)
        teacher_arch="wrn34-10",  # self-trained teacher (no --teacher): TRADES' WRN-34-10, the RSLAD teacher
    ),
    "quick": Preset(
        # Sized on this 2-core CPU (measured 2026-11-25, 2 threads, channels_last, batch 64, nothing else
        # running). A run this short is limited by its number of SGD steps, so the costly pieces are cut or
        # swapped for cheap ones and the steps kept. Per training image: TRADES ResNet-8 ~2.5 ms, RSLAD
        # mnv2 <- ResNet-8 ~26 ms (1-step attack); ~0.14 s per held-out mnv2 image for clean + PGD-20.
        train_n=8000,  # the student's training images: the first 8,000 (16% of CIFAR-10), 125
        # steps an epoch: 41.5% clean / 20.0% PGD-20 from a 25,000-image
        # teacher, where 4,000 gave 36.0% / 15.0% (200 held-out images)
        eval_n=200,  # held-out test images evaluated per epoch (clean + PGD-20)
        eval_batch_size=200,  # images per evaluation batch
        epochs=3,  # the student's epochs
        batch_size=64,  # images per SGD step (official 128): twice the steps for the same
        # compute, which is what a run this short is limited by
        attack_steps=1,  # training attack: PGD steps (official: 10), step size scaled as above
        final_decay=True,  # lr milestones: [epochs - 1], lr x gamma (0.1) for the last epoch only
        scale_epoch_hparams=True,  # `epoch_hparams` scaled by epochs / official epochs
        epoch_hparams=("begin",),  # method hyperparameters counted in epochs (IAD's warm-up length)
        channels_last=True,  # mnv2 on this CPU: 1.75 s vs 2.19 s per forward + input gradient of 128
        # images (resnet18: 2.45 vs 2.31 s, so --no-channels-last for it)
        per_image_loss_lr=True,  # RSLAD averages its KL over the B*C logits, so its gradient is 1/C of a
        # per-image KL's (C = 10; on CIFAR-100 its x10 kl_scale makes the factor C / kl_scale = 10 again:
        # Method.per_image_factor): 300 epochs absorb that, a few hundred steps do not (lr 0.1:
        # 29.5% clean but 0.0% PGD-20 after 4,000 images x 3 epochs; lr 1.0 with
        # weight decay 2e-5: 36.0% / 15.0%). So lr x C and weight decay / C, which
        # is exactly SGD on the per-image KL at lr 0.1, weight decay 2e-4
        # (tests/test_train.py checks the equivalence)
        # The self-trained teacher: He et al.'s CIFAR ResNet-8 (78k parameters) trained with TRADES. It
        # costs ~20x less per TRADES image than mnv2 here (2.5 vs 54 ms), so it sees 10x the images: 20,000 x
        # 4 epochs in ~3.5 minutes. Measured: 10,000 x 4 epochs gave 41.5% clean / 20.0% PGD-20, 25,000 x 4
        # gave 46.5% / 20.0%, widths 32/64/128 (4x the parameters, 2.7x the time) 41.0% / 21.0%, a 2-step
        # attack 39.0% / 21.5%; an mnv2 teacher (4,000 x 3 epochs, ~11 minutes) reached 21.0% / 13.0%.
        teacher_arch="resnet8",
        teacher_train_n=20000,  # the teacher's training images (an explicit --train-n sizes both runs)
        teacher_epochs=4,  # the teacher's epochs (its lr decays for the last one, as above)
    ),
}

# ---- 3. The command line -------------------------------------------------------------------------------

# options of the invocation, not settings of the run: with --resume (every setting from config.json) the only
# flags allowed
RUN_OPTIONS = ("resume", "no_download", "no_progress")


def _method_hparams() -> dict:
    """name -> {method name: HParam} over every registered method."""
    from rslad_fast import methods

    union: dict = {}
    for mname in methods.names():
        for key, hp in methods.get(mname).HPARAMS.items():
            union.setdefault(key, {})[mname] = hp
    return union


def _default_text(method: str, key: str, hp) -> str:
    """A hyperparameter's default as help text; per student family where the official code has two
    settings (MART: train_resnet.py for ResNet-style students, train_wideresnet.py for the wide ResNets)."""
    from rslad_fast import methods

    cls = methods.get(method)
    small, wide = (cls.official_setting(s)[1].get(key, hp.default) for s in ("resnet18", "wrn34-10"))
    return fmt_value(small) if small == wide else f"{fmt_value(small)} ({fmt_value(wide)} for WRN students)"


def _per_preset(field: str) -> str:
    """A preset setting's value in each preset, for --help: "paper 1000, quick 200"."""
    return ", ".join(f"{name} {getattr(preset, field)}" for name, preset in PRESETS.items())


def build_parser() -> argparse.ArgumentParser:
    from rslad_fast import methods
    from rslad_fast.data import NAMES as DATASETS
    from rslad_fast.engine.config import TEACHER_DTYPES
    from rslad_fast.models import ARCHS, WRN70_NORMS

    p = Parser(
        prog="python -m rslad_fast.train",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n" + __doc__.split("\n\n", 1)[1].split("\n\nData:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--student", help=f"architecture to train: {', '.join(ARCHS)} (default resnet18)")
    g.add_argument("--method", help=f"training method: {', '.join(methods.names())} (default rslad)")
    g.add_argument(
        "--teacher",
        metavar="PATH",
        help="teacher checkpoint for distillation methods (a state dict, or one inside {'state_dict': "
        "...}, {'model': ...}, {'net': ...} (ARD) or {'model_state_dict': ...}, e.g. TRADES' "
        "model_cifar_wrn.pt or a run's last.pt). Without it the run first trains its own teacher "
        "with TRADES in RUN_DIR/teacher/",
    )
    g.add_argument(
        "--teacher-arch",
        help="the teacher's architecture (default for --teacher: wrn34-10, on cifar100 wrn70-16, the official "
        "RSLAD teachers; for a self-trained teacher the preset's: " + _per_preset("teacher_arch") + ")",
    )
    g.add_argument(
        "--teacher-dtype",
        choices=TEACHER_DTYPES,
        help="precision of the teacher's weights and forward, its logits handed on in fp32 (default: fp32; "
        "fp16 on cifar100, as the official RSLAD CIFAR-100 scripts' teacher.half())",
    )
    g.add_argument(
        "--wrn70-16-norm",
        choices=WRN70_NORMS,
        help="the mean/std a WRN-70-16 (teacher or student) normalizes its input with: cifar10 (default, on "
        "both data sets: the official RSLAD cifar100_models/wideresnet.py builds its CIFAR-100 teacher so) or "
        "cifar100 (the constants DeepMind's model zoo uses for its CIFAR-100 models)",
    )
    g.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="paper (default): the method's official settings; quick: a CPU-sized run, see rslad_fast/train.py",
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        help="cifar10 (default) or cifar100: every model's class count (10 or 100); on cifar100 RSLAD's loss "
        "is the official CIFAR-100 scripts' (--kl-scale 10, --log-of-softmax) and the teacher runs in fp16",
    )
    g.add_argument(
        "--data",
        metavar="DIR",
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the official python layouts; default ./data)",
    )
    g.add_argument(
        "--train-n",
        type=int,
        help="use the first N training images, for the student and a self-trained teacher (default: preset; paper all)",
    )
    g.add_argument(
        "--eval-n",
        type=int,
        help="held-out test images (the first N) evaluated with clean and "
        f"PGD-20 accuracy after every epoch (default: {_per_preset('eval_n')}, "
        "or the whole test set when it is smaller; an explicit N larger "
        "than the test set is an error)",
    )
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
    g = p.add_argument_group("optimization (default: the method's official schedule)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument(
        "--batch-size",
        type=int,
        help="images per SGD step and process: under torchrun the global batch is this x WORLD_SIZE",
    )
    g.add_argument(
        "--lr",
        type=number,
        help="initial learning rate, used as given whatever the number of processes (not scaled with the global batch)",
    )
    g.add_argument("--momentum", type=number, help="SGD momentum")
    g.add_argument("--weight-decay", type=number, help="L2 weight decay (SGD weight_decay)")
    g.add_argument(
        "--milestones",
        type=milestones,
        help="comma-separated 0-based epochs at which lr *= gamma (MultiStepLR), or 'none'",
    )
    g.add_argument("--gamma", type=number, help="lr decay factor at each milestone")
    g = p.add_argument_group("execution")
    g.add_argument("--seed", type=int, help="seed of every random stream (default 0)")
    g.add_argument("--device", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--loader", choices=("torch", "dali"), help="training data loader (default torch; dali: CUDA only)")
    g.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's default; recorded, and reused on resume for bitwise reproducibility)",
    )
    g.add_argument(
        "--amp",
        choices=("fp32", "bf16"),
        help="training precision (default fp32; bf16: autocast of the "
        "student's and teacher's passes with fp32 master weights, for GPUs with bf16 units; "
        "evaluation always runs in fp32)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format for the models and batches (default: quick on, paper off; "
        "faster for mnv2 on the CPU and for bf16 on GPUs)",
    )
    g.add_argument(
        "--allow-tf32",
        action="store_true",
        default=None,
        help="CUDA: allow TF32 convolutions and matmuls in training and its per-epoch evaluation "
        "(default: strict fp32, as `evaluate`'s default; recorded in config.json)",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        default=None,
        help="under torchrun: SyncBatchNorm, batch statistics over all processes (CUDA only); default: "
        "BatchNorm per process, as single-GPU training",
    )
    g.add_argument(
        "--teacher-cache",
        choices=("auto", "on", "off"),
        help="distillation: keep the frozen teacher's fp32 logits of each augmented view (image x crop x "
        "flip, 162 per image) on the training device, so each view goes through the teacher once "
        "per run instead of once per epoch (the full set: 324 MB). auto (default): on for "
        + " and ".join(n for n in methods.names() if methods.get(n).TEACHER_CACHE_AUTO)
        + ", whose teacher sees only the natural batch, where it fits in memory; on: also for "
        "iad (its T(x) part; T(x') is never cached), an error where it does not fit",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group(
        "method hyperparameters (default: the chosen method's official value; a flag the "
        "chosen method does not have is an error)"
    )
    for key, per_method in _method_hparams().items():
        defaults = [hp.default for hp in per_method.values()]
        first = per_method.get("rslad") or next(iter(per_method.values()))
        values = ", ".join(f"{m} {_default_text(m, key, hp)}" for m, hp in per_method.items())
        help_text = f"{first.help} [default: {values}]".replace("%", "%%")
        flag = "--" + key.replace("_", "-")
        if all(isinstance(d, bool) for d in defaults):
            g.add_argument(flag, dest=f"hp_{key}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif all(isinstance(d, int) and not isinstance(d, bool) for d in defaults):
            g.add_argument(flag, dest=f"hp_{key}", type=int, metavar="N", help=help_text)
        elif all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults):
            g.add_argument(flag, dest=f"hp_{key}", type=number, metavar="X", help=help_text)
        else:
            g.add_argument(flag, dest=f"hp_{key}", metavar="VALUE", help=help_text)
    return p


def resolve_config(args: argparse.Namespace):
    """The validated Config of a new run (and of its self-trained teacher) from parsed arguments."""
    from rslad_fast.engine import resolve

    preset_name = args.preset or "paper"
    preset = PRESETS[preset_name]
    hparams = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None}
    cli = {**vars(args), "student": args.student or "resnet18", "method": args.method or "rslad", "hparams": hparams}
    cfg = resolve(cli, preset_name, preset, EVAL_ATTACK)
    if cfg.teacher is not None and cfg.teacher["source"] == "trained":
        # The teacher: TRADES on the teacher architecture with the preset's settings; only the data (and its
        # class count), execution settings and seed are shared with the student.
        # A preset may size the teacher's run apart from the student's (quick: a cheap teacher, more images);
        # an explicit --train-n applies to both.
        train_n = cfg.train_n
        if args.train_n is None and preset.teacher_train_n is not None:
            train_n = preset.teacher_train_n
        tcli = dict(
            student=cfg.teacher["arch"],
            method="trades",
            hparams={},
            data=cfg.data,
            dataset=cfg.dataset,
            wrn70_16_norm=cfg.wrn70_16_norm,
            seed=cfg.seed,
            device=cfg.device,
            loader=cfg.loader,
            threads=cfg.threads,
            train_n=train_n,
            epochs=preset.teacher_epochs,
            eval_n=cfg.eval_n,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            allow_tf32=cfg.allow_tf32,
            sync_bn=cfg.sync_bn,
        )
        cfg.teacher_run = resolve(tcli, preset_name, preset, EVAL_ATTACK).to_dict()
        cfg.teacher_run["versions"] = cfg.versions
    return cfg


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (and torchrun, when a rank fails) send before a kill: handled as Ctrl-C is,
    a clean stop between two writes, each of which is atomic."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _stop_status(e: KeyboardInterrupt) -> tuple:
    """(what happened, exit status): 128 + the signal number, as a shell reports a process it ended."""
    return (
        ("terminated (SIGTERM)", 128 + signal.SIGTERM)
        if isinstance(e, Terminated)
        else ("interrupted", 128 + signal.SIGINT)
    )


def _settings_given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The flags of run settings that the command line gave (any value but the flag's default)."""
    return [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings and a.dest not in RUN_OPTIONS and getattr(args, a.dest, a.default) != a.default
    ]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with sigterm_as_interrupt():
        return torchrun_main(lambda dist: run_parsed(parser, args, dist))


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace, dist) -> int:
    """One run from parsed arguments in an already joined process group (``dist``): what ``main`` does after
    parsing, and what ``reproduce`` calls for each run of its sweep. Returns the exit status."""
    try:
        return _main(args, dist, _settings_given(parser, args))
    except KeyboardInterrupt as e:  # during the checks: nothing written, nothing to continue
        what, status = _stop_status(e)
        if dist.is_main:
            print(f"\n{what}", file=sys.stderr)
        return status


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) while inside; only the main thread can
    install signal handlers, elsewhere (a test's thread) nothing changes."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _check(args, dist, given):
    """Phase 1, on every rank: every check that can fail on user input; nothing is written. Returns
    (run_dir, cfg, prep). ``given``: the run settings on the command line."""
    from rslad_fast.engine import check_out_dir, prepare, read_config
    from rslad_fast.errors import UserError

    if args.resume:
        if given:
            raise UserError(f"--resume takes every setting from RUN_DIR/config.json; drop {', '.join(given)}")
        run_dir = Path(args.resume)
        cfg = read_config(run_dir)
    else:
        cfg = resolve_config(args)
        run_dir = Path(args.out or f"runs/{cfg.method}-{cfg.student}-{cfg.preset}-seed{cfg.seed}")
        check_out_dir(run_dir, args.overwrite)
    dist.device(cfg.device)  # torchrun: one GPU per local rank
    prep = prepare(
        cfg,
        download=False if args.no_download else "auto",  # all checks; writes nothing
        eval_n_given=bool(args.resume) or args.eval_n is not None,
    )
    return run_dir, cfg, prep


def _main(args, dist, given) -> int:
    from rslad_fast.engine import create_run_dir
    from rslad_fast.engine.runner import RunLock
    from rslad_fast.errors import UserError

    def lock_run_dir():
        if not dist.is_main:
            return None
        return RunLock(run_dir) if args.resume else create_run_dir(run_dir, cfg, overwrite=args.overwrite, dist=dist)

    # After each phase the ranks agree (one collective): if any failed, rank 0 prints the first error and all
    # of them exit, none waits. Rank 0 locks the run directory for the whole run (a new run: creates or empties
    # it under the lock); agreeing on that too stops every rank when the directory is in use, and means that
    # rank 0 has created the run directory before any rank looks into it.
    try:
        run_dir, cfg, prep = agreed(dist, lambda: _check(args, dist, given))
        lock = agreed(dist, lock_run_dir)
    except UserError as e:
        if dist.is_main:
            print_error(e)
        return 2
    try:
        return _train(args, dist, run_dir, cfg, prep)
    finally:
        if lock is not None:
            lock.close()


def _train(args, dist, run_dir, cfg, prep) -> int:
    from rslad_fast.engine import Diverged, run
    from rslad_fast.engine.checkpoint import WriteError
    from rslad_fast.engine.estimate import batches_per_epoch, long_cpu_run_note, self_trained_teacher_note
    from rslad_fast.errors import UserError

    try:
        if dist.is_main:
            for note in prep.notes:
                print(f"note: {note}")
            teacher = cfg.teacher and (cfg.teacher.get("path") or f"self-trained {cfg.teacher['arch']} (TRADES)")
            batch = f"batch {cfg.batch_size}"
            if dist.launched:
                batch += f" x {dist.world_size} processes = {cfg.batch_size * dist.world_size}" + (
                    ", SyncBatchNorm" if cfg.sync_bn else ", BatchNorm per process"
                )
            print(
                f"{'resume' if args.resume else 'run'} {run_dir}: {cfg.method} {cfg.student}, preset "
                f"{cfg.preset}, {cfg.epochs} epochs, {batch}, lr {cfg.lr:g} "
                f"(x{cfg.gamma:g} at {cfg.milestones}), wd {cfg.weight_decay:g}, train images "
                f"{len(prep.train[0])}, eval {cfg.eval_n}, device {cfg.device}, {cfg.threads} threads, {cfg.amp}"
                f"{', channels_last' if cfg.channels_last else ''}"
                + (f", teacher {teacher} in {cfg.teacher_dtype}" if teacher else "")
                + (f", {cfg.dataset}" if cfg.dataset != "cifar10" else ""),
                flush=True,
            )
            if not args.resume and prep.teacher_prep is not None:  # a resume's teacher may be trained already
                note = self_trained_teacher_note(
                    cfg, len(prep.train[0]), len(prep.teacher_prep.train[0]), dist.world_size
                )
                print(f"note: {note}", flush=True)
            if not args.resume and cfg.preset != "quick":
                batches = batches_per_epoch(len(prep.train[0]), cfg.batch_size, dist.world_size) * cfg.epochs
                if prep.teacher_prep is not None:
                    t = prep.teacher_prep.cfg
                    batches += (
                        batches_per_epoch(len(prep.teacher_prep.train[0]), t.batch_size, dist.world_size) * t.epochs
                    )
                note = long_cpu_run_note(cfg.device, batches)
                if note:
                    print(f"note: {note}", flush=True)
        summary = run(prep, run_dir, dist=dist, progress=not args.no_progress)
    except WriteError as e:  # disk full, a folder turned read-only: rank 0's writes; torchrun stops the others
        print_error(f"{e}; once that is fixed, continue with: python -m rslad_fast.train --resume {run_dir}")
        return 2
    except UserError as e:
        # after the agreement: a broken checkpoint or a changed run directory, seen by the rank(s) reading
        # it; torchrun stops the others
        print_error(e)
        return 2
    except OSError as e:  # any other file-system failure (every checkpoint write is atomic: nothing is torn)
        print_error(
            f"{e.filename or run_dir}: {e.strerror or e}; once that is fixed, continue with: "
            f"python -m rslad_fast.train --resume {run_dir}"
        )
        return 2
    except Diverged as e:  # the epoch's loss is all-reduced: every rank diverges together; one says it
        if dist.is_main:
            print_error(e)
        return 1
    except KeyboardInterrupt as e:
        what, status = _stop_status(e)
        if dist.is_main:
            print(f"\n{what}; continue with: python -m rslad_fast.train --resume {run_dir}", file=sys.stderr)
        return status
    if dist.is_main and summary:
        print(
            f"done {run_dir}: clean {100 * summary.get('clean_acc', float('nan')):.2f}%, PGD-20 "
            f"{100 * summary.get('pgd20_acc', float('nan')):.2f}% on {cfg.eval_n} held-out test images "
            f"(best PGD-20 {100 * summary['best_acc']:.2f}%)"
        )
    return 0


if __name__ == "__main__":
    from rslad_fast.engine.dist import exit_process

    exit_process(main())  # torchrun: see exit_process
