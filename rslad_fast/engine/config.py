"""The resolved configuration of one training run: every value the run uses, validated, JSON-serializable.

Resolution order for each setting: explicit command-line value > preset > the method's official value
(``Method.HPARAMS`` defaults and ``Method.SCHEDULE``, cited in each method's module). A preset is a
:class:`Preset`; the presets themselves live in ``rslad_fast/train.py``, next to the documentation of every
value; this module only applies them (:func:`resolve`) and checks ranges (:func:`validate`). ``config.json`` is
``Config.to_dict()``; a resumed run is rebuilt from it with :meth:`Config.from_dict`.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.data.cifar import num_classes
from rslad_fast.errors import UserError
from rslad_fast.models import WRN70_NORMS, canonical_name

CONFIG_FORMAT = 1
TEACHER_DTYPES = ("fp32", "fp16", "bf16")  # --teacher-dtype: the teacher's weights and forward
# the teacher's dtype where --teacher-dtype is not given: the official RSLAD CIFAR-100 scripts run their
# teacher in half precision (resnet18_rslad_cifar100.py `teacher = teacher.half()`), the CIFAR-10 ones in fp32
DEFAULT_TEACHER_DTYPE = {"cifar10": "fp32", "cifar100": "fp16"}
# a --teacher file's architecture where --teacher-arch is not given: the official RSLAD teachers, TRADES'
# WRN-34-10 on CIFAR-10 and DeepMind's WRN-70-16 on CIFAR-100 (resnet18_rslad_cifar100.py WideResNet_70_16())
DEFAULT_TEACHER_ARCH = {"cifar10": "wrn34-10", "cifar100": "wrn70-16"}


@dataclass(frozen=True)
class Preset:
    """Settings between the command line and the method's official values (``train.PRESETS``, where each
    value is explained). None, False and (): the official value, untouched."""

    eval_n: int  # held-out test images (the first ones) evaluated after every epoch
    eval_batch_size: int  # images per evaluation batch (memory only)
    teacher_arch: str  # a self-trained teacher's architecture (no --teacher)
    train_n: Optional[int] = None  # training images, the first ones (None: all 50,000)
    epochs: Optional[int] = None  # the student's epochs
    batch_size: Optional[int] = None  # images per SGD step and process
    attack_steps: Optional[int] = None  # training attack cut to this many PGD steps, the step size scaled
    # so that steps * step_size stays the official
    final_decay: bool = False  # lr milestones [epochs - 1]: one decay, for the last epoch
    scale_epoch_hparams: bool = False  # `epoch_hparams` scaled by epochs / official epochs
    epoch_hparams: Tuple[str, ...] = ()  # method hyperparameters counted in epochs
    channels_last: Optional[bool] = None  # channels_last memory format (None: off)
    per_image_loss_lr: bool = False  # a per-logit-mean loss (Method.LOSS_PER_ELEMENT): lr x f, weight
    # decay / f with f = Method.per_image_factor(C) (C / kl_scale for RSLAD: 10 on CIFAR-10 and, at the
    # official kl_scale 10, on CIFAR-100), i.e. SGD on its per-image form at the official values
    teacher_train_n: Optional[int] = None  # a self-trained teacher's training images (None: train_n)
    teacher_epochs: Optional[int] = None  # a self-trained teacher's epochs (None: its official ones)


@dataclass
class Config:
    student: str  # canonical architecture name (models.ARCHS)
    method: str  # registry name (methods.REGISTRY)
    hparams: dict  # all of the method's hyperparameters, resolved
    preset: str  # "paper" or "quick"
    seed: int
    data: str  # absolute path of the folder holding the data set's folder (cifar-10-batches-py/, cifar-100-python/)
    train_n: Optional[int]  # first train_n training images (None: all 50,000)
    eval_n: int  # first eval_n test images, evaluated after every epoch
    epochs: int
    batch_size: int  # per process: under torchrun the global batch is batch_size x WORLD_SIZE
    lr: float  # used as given at any world size (not scaled with the global batch)
    momentum: float
    weight_decay: float
    milestones: list  # 0-based epochs (MultiStepLR convention) at which lr *= gamma
    gamma: float
    device: str  # "cpu", "cuda", "cuda:1", ...
    loader: str  # "torch" or "dali"
    threads: int  # torch intra-op CPU threads (fixed: part of bitwise reproducibility)
    eval_attack: dict  # the held-out PGD-20 evaluation (train.EVAL_ATTACK)
    eval_batch_size: int
    amp: str = "fp32"  # training precision: "fp32", or "bf16" autocast (fp32 master weights);
    # evaluation attacks always run in fp32
    channels_last: bool = False  # student and teacher (and their inputs) in channels_last memory format
    allow_tf32: bool = False  # CUDA: TF32 convolutions and matmuls, in training and its held-out
    # evaluation alike; off by default, as in `evaluate`: fp32 means fp32
    # (torch's own default leaves cuDNN TF32 on and matmul TF32 off)
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (batch statistics over all ranks); False:
    # BatchNorm per rank, as single-GPU training (CUDA only: torch's
    # SyncBatchNorm does not run on the CPU)
    teacher_cache: str = "off"  # --teacher-cache: "auto" (on for Method.TEACHER_CACHE_AUTO methods, off
    # with a note when it does not fit), "on", "off" (engine/teacher_cache.py);
    # "off" for runs written before the field existed, as they trained
    teacher: Optional[dict] = None  # {"source": "file", "path", "arch", "dtype"} | {"source": "trained", "arch",
    # "dir", "dtype"}; "dtype" (TEACHER_DTYPES): the teacher's forward, "fp32" where absent (older runs)
    teacher_run: Optional[dict] = None  # the self-trained teacher's own Config, as a dict
    schedule_source: str = ""  # where the method's official schedule comes from
    dataset: str = "cifar10"  # data.NAMES; every model has its class count; "cifar10" for runs written
    # before the field existed, as they trained
    wrn70_16_norm: str = "cifar10"  # the mean/std every WRN-70-16 of the run normalizes with
    # (models.WRN70_NORMS; the official RSLAD code's CIFAR-10 constants by default, models/wrn_dm.py)
    versions: dict = field(default_factory=dict)
    format: int = CONFIG_FORMAT

    def to_dict(self) -> dict:
        """Plain JSON types only (a JSON round trip): what config.json holds and what checkpoints embed,
        so that checkpoints stay weights_only-loadable and compare equal to a config read back from disk."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def num_classes(self) -> int:
        """The data set's class count: every model's outputs."""
        return num_classes(self.dataset)

    @property
    def teacher_dtype(self) -> str:
        return (self.teacher or {}).get("dtype", "fp32")

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(d, dict) or d.get("format") != CONFIG_FORMAT or not names >= set(d) or not required <= set(d):
            raise UserError(f"config.json is not a run configuration of this engine (format {CONFIG_FORMAT})")
        return cls(**d)


def read_config_file(path) -> dict:
    """A run directory's config.json as a dict (before any check of its keys): the one reader of it, for
    ``--resume`` (:meth:`Config.from_dict` then) and ``evaluate --run`` (which needs only a few keys)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a JSON object")
    return d


# ---- versions --------------------------------------------------------------------------------------------


def versions() -> dict:
    import rslad_fast

    commit = None
    try:
        root = Path(rslad_fast.__file__).resolve().parent.parent
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            commit = res.stdout.strip()
    except Exception:  # no git, not a checkout: the commit is optional information
        pass
    out = {
        "rslad_fast": rslad_fast.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "ops_backend": rslad_fast.ops.backend(),
        "ops_cuda_kernels": rslad_fast.ops.cuda_kernels_available(),
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
    from rslad_fast import ops

    try:
        ops.check_device(device)
    except RuntimeError as e:
        raise UserError(str(e)) from None


def resolve(cli: dict, preset_name: str, preset: Preset, eval_attack: dict) -> Config:
    """Turn command-line values (None = not given) and a preset into a validated :class:`Config`.

    ``cli`` keys: student, method, hparams (dict of explicitly given method hyperparameters), teacher,
    teacher_arch, data, epochs, batch_size, lr, momentum, weight_decay, milestones, gamma, seed, device,
    loader, threads, train_n, eval_n, amp, channels_last, allow_tf32, sync_bn, teacher_cache, dataset,
    teacher_dtype, wrn70_16_norm.
    """
    from rslad_fast import methods

    method_cls = methods.get(cli["method"])
    student = canonical_name(cli["student"])
    dataset = _pick(cli.get("dataset"), "cifar10")
    _check(dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    # the official schedule and defaults for this student's architecture (MART's code has two settings) and
    # data set (RSLAD's CIFAR-100 scripts scale its loss)
    sch, defaults = method_cls.official_setting(student, dataset)

    given = dict(cli.get("hparams") or {})
    unknown = sorted(set(given) - set(method_cls.HPARAMS))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        has = ", ".join("--" + k.replace("_", "-") for k in method_cls.HPARAMS) or "none"
        raise UserError(f"{flags}: not a hyperparameter of method '{method_cls.name}' (its hyperparameters: {has})")

    epochs = _pick(cli.get("epochs"), preset.epochs, sch.epochs)
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
    method = method_cls(**hp)  # validates (UserError on eps outside [0, 1], negative steps, ...)
    hparams = method.hparams()
    if "eps" in hparams and not 0.0 <= float(hparams["eps"]) <= 1.0:  # belt and braces for any method
        raise UserError(f"eps must be in [0, 1] (inputs live in [0, 1]), got {hparams['eps']}")

    if cli.get("milestones") is not None:
        milestones = list(cli["milestones"])
    elif preset.final_decay and isinstance(epochs, int):
        milestones = [epochs - 1] if epochs > 1 else []  # quick: one decay, for the last epoch
    else:
        milestones = list(method.milestones())  # the decays the official code really applies (lr_bug)

    teacher = None
    teacher_dtype = _pick(cli.get("teacher_dtype"), DEFAULT_TEACHER_DTYPE[dataset])
    if method_cls.needs_teacher:
        if cli.get("teacher"):
            teacher = {
                "source": "file",
                "path": str(Path(cli["teacher"]).expanduser().resolve()),
                "arch": canonical_name(cli.get("teacher_arch") or DEFAULT_TEACHER_ARCH[dataset]),
            }
        else:
            teacher = {
                "source": "trained",
                "arch": canonical_name(cli.get("teacher_arch") or preset.teacher_arch),
                "dir": "teacher",
            }
        teacher["dtype"] = teacher_dtype
    elif cli.get("teacher") or cli.get("teacher_arch") or cli.get("teacher_dtype"):
        raise UserError(
            f"method '{method_cls.name}' trains without a teacher; drop --teacher/--teacher-arch/--teacher-dtype "
            f"(distillation methods: "
            f"{', '.join(n for n, c in sorted(methods.REGISTRY.items()) if c.needs_teacher)})"
        )

    teacher_cache = cli.get("teacher_cache")
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
    device = resolve_device(cli.get("device"))
    threads = _pick(cli.get("threads"), torch.get_num_threads())
    cfg = Config(
        student=student,
        method=method_cls.name,
        hparams=hparams,
        preset=preset_name,
        seed=_pick(cli.get("seed"), 0),
        data=str(Path(_pick(cli.get("data"), "./data")).expanduser().resolve()),
        train_n=_pick(cli.get("train_n"), preset.train_n),
        eval_n=_pick(cli.get("eval_n"), preset.eval_n),
        epochs=epochs,
        batch_size=_pick(cli.get("batch_size"), preset.batch_size, sch.batch_size),
        lr=_pick(cli.get("lr"), lr),
        momentum=_pick(cli.get("momentum"), sch.momentum),
        weight_decay=_pick(cli.get("weight_decay"), weight_decay),
        milestones=milestones,
        gamma=_pick(cli.get("gamma"), sch.gamma),
        device=device,
        loader=_pick(cli.get("loader"), "torch"),
        threads=threads,
        amp=_pick(cli.get("amp"), "fp32"),
        channels_last=bool(_pick(cli.get("channels_last"), preset.channels_last, False)),
        allow_tf32=bool(cli.get("allow_tf32") or False),
        sync_bn=bool(cli.get("sync_bn") or False),
        teacher_cache=_pick(teacher_cache, "auto"),
        eval_attack=dict(eval_attack),
        eval_batch_size=preset.eval_batch_size,
        teacher=teacher,
        schedule_source=sch.source,
        versions=versions(),
        dataset=dataset,
        wrn70_16_norm=_pick(cli.get("wrn70_16_norm"), "cifar10"),
    )
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg: Config) -> None:
    """Range checks of the engine's own settings (the method validated its hyperparameters)."""
    _check(_is_int(cfg.epochs) and cfg.epochs >= 1, f"--epochs must be an integer >= 1, got {cfg.epochs!r}")
    _check(
        _is_int(cfg.batch_size) and cfg.batch_size >= 1, f"--batch-size must be an integer >= 1, got {cfg.batch_size!r}"
    )
    _check(_finite(cfg.lr) and cfg.lr > 0, f"--lr must be a finite number > 0, got {cfg.lr!r}")
    _check(_finite(cfg.momentum) and 0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum!r}")
    _check(
        _finite(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay!r}",
    )
    _check(_finite(cfg.gamma) and 0 < cfg.gamma <= 1, f"--gamma must be in (0, 1], got {cfg.gamma!r}")
    _check(
        all(_is_int(m) and m >= 0 for m in cfg.milestones),
        f"--milestones must be integers >= 0, got {cfg.milestones!r}",
    )
    _check(_is_int(cfg.seed) and 0 <= cfg.seed < 2**63, f"--seed must be an integer in [0, 2^63), got {cfg.seed!r}")
    _check(
        cfg.train_n is None or (_is_int(cfg.train_n) and cfg.train_n >= 1),
        f"--train-n must be an integer >= 1, got {cfg.train_n!r}",
    )
    _check(_is_int(cfg.eval_n) and cfg.eval_n >= 1, f"--eval-n must be an integer >= 1, got {cfg.eval_n!r}")
    _check(_is_int(cfg.threads) and cfg.threads >= 1, f"--threads must be an integer >= 1, got {cfg.threads!r}")
    _check(cfg.loader in ("torch", "dali"), f"--loader must be torch or dali, got {cfg.loader!r}")
    _check(cfg.amp in ("fp32", "bf16"), f"--amp must be fp32 or bf16, got {cfg.amp!r}")
    _check(isinstance(cfg.channels_last, bool), f"channels_last must be true or false, got {cfg.channels_last!r}")
    _check(isinstance(cfg.allow_tf32, bool), f"allow_tf32 must be true or false, got {cfg.allow_tf32!r}")
    _check(
        cfg.hparams.get("cuda_graph") is not True or cfg.device.startswith("cuda"),
        f"--cuda-graph true needs a CUDA device (the graph captures CUDA kernels) but the device is "
        f"{cfg.device}; use --cuda-graph auto (a graph on CUDA, eager elsewhere) or false",
    )
    _check(isinstance(cfg.sync_bn, bool), f"sync_bn must be true or false, got {cfg.sync_bn!r}")
    _check(
        not cfg.sync_bn or cfg.device.startswith("cuda"),
        f"--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU) but the device is "
        f"{cfg.device}; drop --sync-bn (BatchNorm is then per rank) or train with --device cuda",
    )
    _check(
        cfg.teacher_cache in ("auto", "on", "off"),
        f"--teacher-cache must be auto, on or off, got {cfg.teacher_cache!r}",
    )
    _check(
        cfg.teacher_cache != "on" or cfg.teacher is not None,
        f"--teacher-cache on: method '{cfg.method}' trains without a teacher",
    )
    _check(_is_int(cfg.eval_batch_size) and cfg.eval_batch_size >= 1, "eval batch size must be >= 1")
    _check(cfg.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    _check(
        cfg.wrn70_16_norm in WRN70_NORMS,
        f"--wrn70-16-norm must be one of {', '.join(WRN70_NORMS)}, got {cfg.wrn70_16_norm!r}",
    )
    _check(
        cfg.teacher is None or (isinstance(cfg.teacher, dict) and cfg.teacher_dtype in TEACHER_DTYPES),
        f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}, got {cfg.teacher_dtype!r}"
        if isinstance(cfg.teacher, dict)
        else f"teacher must be a mapping, got {cfg.teacher!r}",
    )
    ea = cfg.eval_attack
    _check(0 <= ea["eps"] <= 1, f"evaluation eps must be in [0, 1], got {ea['eps']}")
