"""The flags of a run's settings (``engine.RunSettings``), shared by the command lines that start runs:
``train`` and ``reproduce`` add them with :func:`add_run_flags` and read them back with
:func:`settings_from_args`, so a flag added here reaches both without touching either. Each flag's help
names its default: the preset's or the chosen method's official value (``engine/presets.py``,
``rslad_fast/methods/<method>.py``)."""

from __future__ import annotations

import argparse

from rslad_fast import methods
from rslad_fast.cli import fmt_value, milestones, number
from rslad_fast.data import NAMES as DATASETS
from rslad_fast.engine.config import TEACHER_DTYPES
from rslad_fast.engine.presets import PRESETS
from rslad_fast.engine.settings import RunSettings
from rslad_fast.models import ARCHS, WRN70_NORMS

HP_PREFIX = "hp_"  # a method hyperparameter's argparse dest: hp_<name> (names may clash with other flags)


class _Skipping:
    """An argument group that leaves out the flags whose dest is in ``skip`` (a command that sets those
    itself, as ``reproduce`` sets --student and --method per run, or has its own flag of the name)."""

    def __init__(self, group, skip):
        self.group, self.skip = group, set(skip)

    def add_argument(self, flag, **kw):
        dest = kw.get("dest") or flag.lstrip("-").replace("-", "_")
        if dest not in self.skip:
            self.group.add_argument(flag, **kw)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run settings of parsed arguments (None where a flag was not given or not added)."""
    names = [f for f in RunSettings.__dataclass_fields__ if f != "hparams"]
    hparams = {k[len(HP_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(HP_PREFIX) and v is not None}
    return RunSettings(**{n: getattr(args, n, None) for n in names}, hparams=hparams)


def flag_of(name: str) -> str:
    """The flag of a :meth:`RunSettings.given` key: ``--lr``, ``--weight-decay``, ``--eps`` (hp_eps)."""
    return "--" + name.removeprefix(HP_PREFIX).replace("_", "-")


def _method_hparams() -> dict:
    """name -> {method name: HParam} over every registered method."""
    union: dict = {}
    for mname in methods.names():
        for key, hp in methods.get(mname).HPARAMS.items():
            union.setdefault(key, {})[mname] = hp
    return union


def _default_text(method: str, key: str, hp) -> str:
    """A hyperparameter's default as help text; per student family where the official code has two
    settings (MART: train_resnet.py for ResNet-style students, train_wideresnet.py for the wide ResNets)."""
    cls = methods.get(method)
    small, wide = (cls.official_setting(s)[1].get(key, hp.default) for s in ("resnet18", "wrn34-10"))
    return fmt_value(small) if small == wide else f"{fmt_value(small)} ({fmt_value(wide)} for WRN students)"


def _per_preset(field: str) -> str:
    """A preset setting's value in each preset, for --help: "paper 1000, quick 200"."""
    return ", ".join(f"{name} {getattr(preset, field)}" for name, preset in PRESETS.items())


def add_run_flags(p: argparse.ArgumentParser, *, skip=()) -> dict:
    """Add every run-setting flag to ``p`` (but those whose dest is in ``skip``), in --help groups; returns
    the groups by name ("what to train", "data and output", "optimization", "execution", "method
    hyperparameters"), for the command's own flags to join."""
    groups: dict = {}
    g = groups["what to train"] = _Skipping(p.add_argument_group("what to train"), skip)
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
    nat = [n for n in methods.names() if getattr(methods.get(n), "needs_nat_teacher", False)]
    g.add_argument(
        "--nat-teacher",
        metavar="PATH",
        help=f"{', '.join(nat)} only, and required there: the naturally trained teacher's checkpoint (the "
        "same formats as --teacher, read with weights_only=True), which supervises the student on the "
        "natural images while --teacher (or the self-trained one) supervises it on the adversarial ones",
    )
    g.add_argument(
        "--nat-teacher-arch",
        help="the natural teacher's architecture (default: "
        + ", ".join(f"{n} {methods.get(n).NAT_TEACHER_ARCH}" for n in nat)
        + " on CIFAR-10, MTARD cifar10_nat_teacher_models/resnet.py's CIFAR ResNet-56; required on CIFAR-100, "
        "where MTARD's code builds no model this project has); it runs in --teacher-dtype",
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
    g = groups["data and output"] = _Skipping(p.add_argument_group("data and output"), skip)
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
        "--val-n",
        type=int,
        help="hold out N training images (never trained on; the same N images on resume and under torchrun: "
        "Rice et al.'s split, locuslab/robust_overfitting generate_validation.py) for the per-epoch "
        "evaluation, so best.pt is picked by their PGD-20, not the test set's (default: off, best.pt by "
        "the --eval-n test images, the official RSLAD script's habit, kept for reproduction)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also write the per-epoch scalars of metrics.jsonl and the config as TensorBoard events in "
        "RUN_DIR/tensorboard/ (needs the tensorboard package: pip install 'rslad_fast[tensorboard]'); "
        "reproduce: every run's under --out, one log root (tensorboard --logdir OUT)",
    )
    g = groups["optimization"] = _Skipping(
        p.add_argument_group("optimization (default: the method's official schedule)"), skip
    )
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
    g = groups["execution"] = _Skipping(p.add_argument_group("execution"), skip)
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
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="eval-mode passes (the frozen teacher, and the student's attack where the method's official "
        "attack runs in eval mode: rslad, trades, mart, sat) through a copy of the model with every "
        "BatchNorm that follows a conv folded into it, refreshed after each SGD step: the same function up "
        "to float rounding, fewer passes over memory (default on; recorded in config.json)",
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

    g = groups["method hyperparameters"] = _Skipping(
        p.add_argument_group(
            "method hyperparameters (default: the chosen method's official value; a flag the "
            "chosen method does not have is an error)"
        ),
        skip,
    )
    for key, per_method in _method_hparams().items():
        defaults = [hp.default for hp in per_method.values()]
        first = per_method.get("rslad") or next(iter(per_method.values()))
        values = ", ".join(f"{m} {_default_text(m, key, hp)}" for m, hp in per_method.items())
        help_text = f"{first.help} [default: {values}]".replace("%", "%%")
        flag = "--" + key.replace("_", "-")
        if all(isinstance(d, bool) for d in defaults):
            g.add_argument(
                flag, dest=HP_PREFIX + key, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif all(isinstance(d, int) and not isinstance(d, bool) for d in defaults):
            g.add_argument(flag, dest=HP_PREFIX + key, type=int, metavar="N", help=help_text)
        elif all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in defaults):
            g.add_argument(flag, dest=HP_PREFIX + key, type=number, metavar="X", help=help_text)
        else:
            g.add_argument(flag, dest=HP_PREFIX + key, metavar="VALUE", help=help_text)
    return groups
