"""A run's settings resolved into its :class:`Config`: the command line (a :class:`RunSettings`), else the
preset (``presets.py``), else the method's official value (``Method.HPARAMS`` and ``Method.SCHEDULE``, cited in
each method's module); and the self-trained teacher's run derived from its student's (:func:`teacher_settings`,
the one place that says what the teacher shares with its student). Pure but for the host facts it is given
or reads once per process (the default thread count, the library versions and git commit)."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import rslad_fast
from rslad_fast import methods, ops
from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.data.cifar import num_classes
from rslad_fast.errors import UserError
from rslad_fast.models import canonical_name

from .config import DEFAULT_TEACHER_ARCH, DEFAULT_TEACHER_DTYPE, Config, _check, validate
from .hardware import cpu_info
from .presets import CPU_CHOICES, EVAL_ATTACK, PRESETS
from .settings import RunSettings
from .validation import selection_of

# ---- versions --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _commit() -> Optional[str]:
    """The package checkout's git commit (None: not a checkout), read once per process."""

    try:
        root = Path(rslad_fast.__file__).resolve().parent.parent
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            return res.stdout.strip()
    except Exception:  # no git, not a checkout: the commit is optional information
        pass
    return None


def versions() -> dict:

    out = {
        "rslad_fast": rslad_fast.__version__,
        "git_commit": _commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "ops_backend": rslad_fast.ops.backend(),
        "ops_cuda_kernels": rslad_fast.ops.cuda_kernels_available(),
        "cpu": cpu_info(),  # its native-bf16 flags decide the CPU defaults (presets.CPU_CHOICES)
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---- resolution ------------------------------------------------------------------------------------------


def _pick(*values):
    return next((v for v in values if v is not None), None)


def resolve_device(name: Optional[str]) -> str:
    """``--device`` (None: auto) as a torch device string, checked against the CUDA devices there are."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return str(dev)


def check_ops_device(device) -> None:
    """UserError, at start, when the compiled ops cannot run on `device` (a library built without CUDA
    kernels): the first attack would otherwise fail with a dispatcher traceback."""

    try:
        ops.check_device(device)
    except RuntimeError as e:
        raise UserError(str(e)) from None


def resolve(s: RunSettings, *, default_threads: Optional[int] = None, versions_info: Optional[dict] = None) -> Config:
    """The validated :class:`Config` of a new run from the settings given (None: not given) and the preset
    they name, with the self-trained teacher's own Config in ``teacher_run`` when the run distills without
    a teacher file (:func:`teacher_settings`). ``default_threads`` (None: torch's current count) and
    ``versions_info`` (None: :func:`versions`, the git commit read once per process) are the host's facts.
    """
    cfg = _resolve_one(s, default_threads, versions_info)
    if cfg.teacher is not None and cfg.teacher["source"] == "trained":
        cfg.teacher_run = _resolve_one(teacher_settings(s, cfg), default_threads, cfg.versions).to_dict()
    return cfg


def teacher_settings(s: RunSettings, cfg: Config) -> RunSettings:
    """The self-trained teacher's run (a distillation run without a teacher file): TRADES on the teacher
    architecture with the preset's settings; only the data (and its class count), the execution settings
    and the seed are shared with the student ``cfg``. A preset may size the teacher's run apart from the
    student's (quick: a cheap teacher, more images); an explicit train_n applies to both."""
    preset = PRESETS[cfg.preset]
    train_n = cfg.train_n
    if s.train_n is None and preset.teacher_train_n is not None:
        train_n = preset.teacher_train_n
    return RunSettings(
        student=cfg.teacher["arch"],
        method="trades",
        preset=cfg.preset,
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
        val_n=cfg.val_n,  # the teacher never trains on the student's held-out images either
        tensorboard=cfg.tensorboard,  # RUN_DIR/teacher/tensorboard: under the student's log root
        amp=s.amp,  # as given: where not given, the teacher's own architecture chooses (CPU_CHOICES)
        channels_last=s.channels_last,
        allow_tf32=cfg.allow_tf32,
        sync_bn=cfg.sync_bn,
        fold_bn=cfg.fold_bn,
    )


def _cpu_bf16(device: str, arch: str, role: str) -> bool:
    """bf16 pays for ``arch`` in ``role`` ("train_bf16" or "teacher_bf16", presets.CPU_CHOICES) and this CPU
    has native bf16."""
    choice = CPU_CHOICES.get(arch)
    return device == "cpu" and choice is not None and getattr(choice, role) and cpu_info()["native_bf16"]


def _cpu_channels_last(device: str, arch: str) -> Optional[bool]:
    choice = CPU_CHOICES.get(arch)
    return choice.channels_last if device == "cpu" and choice is not None else None


def _resolve_one(s: RunSettings, default_threads: Optional[int], versions_info: Optional[dict]) -> Config:

    preset_name = s.preset or "paper"
    if preset_name not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {preset_name!r}")
    preset = PRESETS[preset_name]
    method_cls = methods.get(s.method or "rslad")
    student = canonical_name(s.student or "resnet18")
    dataset = _pick(s.dataset, "cifar10")
    _check(dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    # the official schedule and defaults for this student's architecture (MART's code has two settings) and
    # data set (RSLAD's CIFAR-100 scripts scale its loss)
    sch, defaults = method_cls.official_setting(student, dataset)

    given = {k: v for k, v in (s.hparams or {}).items() if v is not None}
    unknown = sorted(set(given) - set(method_cls.HPARAMS))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        has = ", ".join("--" + k.replace("_", "-") for k in method_cls.HPARAMS) or "none"
        raise UserError(f"{flags}: not a hyperparameter of method '{method_cls.name}' (its hyperparameters: {has})")

    epochs = _pick(s.epochs, preset.epochs, sch.epochs)
    hp = {**defaults, **given}
    k = preset.attack_steps
    if k is not None and "steps" in defaults and "steps" not in given and defaults["steps"] > k:
        hp["steps"] = k
        if "step_size" in defaults and "step_size" not in given:
            # keep the official total travel steps * step_size (e.g. RSLAD 10 x 2/255 -> 2 x 10/255)
            hp["step_size"] = defaults["step_size"] * defaults["steps"] / k
    if preset.scale_epoch_hparams and isinstance(epochs, int) and epochs > 0:
        for name in preset.epoch_hparams:
            if name in defaults and name not in given:
                hp[name] = int(round(defaults[name] * epochs / sch.epochs))
    for key in getattr(method_cls, "FOLLOWS_RUN_WEIGHT_DECAY", ()):  # PeerAiD's peer: the run's --weight-decay
        if key not in given and s.weight_decay is not None:  # unless its own flag is given (methods/peeraid.py)
            hp[key] = s.weight_decay
    method = method_cls(**hp)  # validates (UserError on eps outside [0, 1], negative steps, ...)
    hparams = method.hparams()
    if "eps" in hparams and not 0.0 <= float(hparams["eps"]) <= 1.0:  # belt and braces for any method
        raise UserError(f"eps must be in [0, 1] (inputs live in [0, 1]), got {hparams['eps']}")

    if s.milestones is not None:
        milestones = list(s.milestones)
    elif preset.final_decay and isinstance(epochs, int):
        milestones = [epochs - 1] if epochs > 1 else []  # quick: one decay, for the last epoch
    else:
        milestones = list(method.milestones())  # the decays the official code really applies (lr_bug)

    device = resolve_device(s.device)
    teacher = None
    if method_cls.needs_teacher:
        if s.teacher:
            teacher = {
                "source": "file",
                "path": str(Path(s.teacher).expanduser().resolve()),
                "arch": canonical_name(s.teacher_arch or DEFAULT_TEACHER_ARCH[dataset]),
            }
        else:
            teacher = {
                "source": "trained",
                "arch": canonical_name(s.teacher_arch or preset.teacher_arch),
                "dir": "teacher",
            }
        # given; else the official CIFAR-100 scripts' fp16; else bf16 where this CPU runs it natively
        # and it pays for the architecture (presets.CPU_CHOICES); else fp32
        teacher["dtype"] = _pick(
            s.teacher_dtype,
            DEFAULT_TEACHER_DTYPE[dataset] if DEFAULT_TEACHER_DTYPE[dataset] != "fp32" else None,
            "bf16" if _cpu_bf16(device, teacher["arch"], "teacher_bf16") else None,
            "fp32",
        )
    elif s.teacher or s.teacher_arch or s.teacher_dtype:
        raise UserError(
            f"method '{method_cls.name}' trains without a teacher; drop --teacher/--teacher-arch/--teacher-dtype "
            f"(distillation methods: "
            f"{', '.join(n for n, c in sorted(methods.REGISTRY.items()) if c.needs_teacher)})"
        )

    nat_teacher = None
    if getattr(method_cls, "needs_nat_teacher", False):  # MTARD: a second, naturally trained teacher file
        if not s.nat_teacher:
            arch = getattr(method_cls, "NAT_TEACHER_ARCHS", {}).get(dataset, f"none on {dataset}")
            raise UserError(
                f"method '{method_cls.name}' needs --nat-teacher FILE, its naturally trained teacher (and "
                f"--nat-teacher-arch, default {arch}) beside the adversarial --teacher"
            )
        nat_teacher = {
            "path": str(Path(s.nat_teacher).expanduser().resolve()),
            # MTARD: resnet56 on CIFAR-10; on CIFAR-100 --nat-teacher-arch is required (UserError)
            "arch": canonical_name(s.nat_teacher_arch or method_cls.default_nat_teacher_arch(dataset)),
        }
    elif s.nat_teacher or s.nat_teacher_arch:
        raise UserError(
            f"--nat-teacher/--nat-teacher-arch: method '{method_cls.name}' takes no second teacher; only "
            f"{', '.join(n for n, c in sorted(methods.REGISTRY.items()) if getattr(c, 'needs_nat_teacher', False))}"
            f" distills from a naturally trained teacher too"
        )

    teacher_cache = s.teacher_cache
    if not method_cls.needs_teacher:
        if teacher_cache == "on":
            raise UserError(f"--teacher-cache on: method '{method_cls.name}' trains without a teacher")
        teacher_cache = "off"
    lr, weight_decay = sch.lr, sch.weight_decay
    factor = method.per_image_factor(num_classes(dataset))
    if preset.per_image_loss_lr and factor != 1:
        # A loss averaged over the B*C logits (RSLAD) has 1/C the gradient of the same loss averaged per
        # image (1/f with RSLAD's kl_scale: f = C / kl_scale, 10 on both data sets at the official values).
        # lr x f with weight decay / f is exactly SGD on the per-image loss at the official lr and weight
        # decay (momentum included): a preset too short to absorb the factor uses it.
        lr, weight_decay = sch.lr * factor, sch.weight_decay / factor
    threads = _pick(s.threads, default_threads, torch.get_num_threads())
    cfg = Config(
        student=student,
        method=method_cls.name,
        hparams=hparams,
        preset=preset_name,
        seed=_pick(s.seed, 0),
        data=str(Path(_pick(s.data, "./data")).expanduser().resolve()),
        train_n=_pick(s.train_n, preset.train_n),
        eval_n=_pick(s.eval_n, preset.eval_n),
        val_n=s.val_n,  # None: best.pt by the test subset, the official habit (engine/validation.py)
        best_selection=selection_of(s.val_n),
        tensorboard=bool(s.tensorboard or False),
        epochs=epochs,
        batch_size=_pick(s.batch_size, preset.batch_size, sch.batch_size),
        lr=_pick(s.lr, lr),
        momentum=_pick(s.momentum, sch.momentum),
        weight_decay=_pick(s.weight_decay, weight_decay),
        milestones=milestones,
        gamma=_pick(s.gamma, sch.gamma),
        device=device,
        loader=_pick(s.loader, "torch"),
        threads=threads,
        amp=_pick(s.amp, "bf16" if _cpu_bf16(device, student, "train_bf16") else None, "fp32"),
        channels_last=bool(_pick(s.channels_last, _cpu_channels_last(device, student), preset.channels_last, False)),
        allow_tf32=bool(s.allow_tf32 or False),
        sync_bn=bool(s.sync_bn or False),
        teacher_cache=_pick(teacher_cache, "auto"),
        fold_bn=bool(_pick(s.fold_bn, True)),  # on unless --no-fold-bn: exact up to float rounding
        eval_attack=dict(EVAL_ATTACK),
        eval_batch_size=preset.eval_batch_size,
        teacher=teacher,
        nat_teacher=nat_teacher,
        schedule_source=sch.source,
        versions=dict(versions_info) if versions_info is not None else versions(),
        dataset=dataset,
        wrn70_16_norm=_pick(s.wrn70_16_norm, "cifar10"),
    )
    validate(cfg)
    return cfg
