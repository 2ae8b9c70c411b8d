"""The resolved configuration of one training run: every value the run uses, validated, JSON-serializable.

A :class:`Config` is made by ``resolution.py`` from a ``settings.RunSettings`` (what the user gave) and a
preset (``presets.py``); this module holds the type, its range checks (:func:`validate`) and the reader of
``config.json`` (``Config.to_dict()``; a resumed run is rebuilt from it with :meth:`Config.from_dict`).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.data.cifar import num_classes
from rslad_fast.errors import UserError
from rslad_fast.models import WRN70_NORMS

from .validation import selection_of

CONFIG_FORMAT = 1
TEACHER_DTYPES = ("fp32", "fp16", "bf16")  # --teacher-dtype: the teacher's weights and forward
# the teacher's dtype where --teacher-dtype is not given: the official RSLAD CIFAR-100 scripts run their
# teacher in half precision (resnet18_rslad_cifar100.py `teacher = teacher.half()`), the CIFAR-10 ones in fp32
DEFAULT_TEACHER_DTYPE = {"cifar10": "fp32", "cifar100": "fp16"}
# a --teacher file's architecture where --teacher-arch is not given: the official RSLAD teachers, TRADES'
# WRN-34-10 on CIFAR-10 and DeepMind's WRN-70-16 on CIFAR-100 (resnet18_rslad_cifar100.py WideResNet_70_16())
DEFAULT_TEACHER_ARCH = {"cifar10": "wrn34-10", "cifar100": "wrn70-16"}


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
    eval_attack: dict  # the held-out PGD-20 evaluation (presets.EVAL_ATTACK)
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
    fold_bn: bool = False  # --fold-bn: the eval-mode passes (the frozen teacher; the student's attack where
    # the method's official attack runs in eval mode) through a copy with each BatchNorm folded into its conv
    # (models/fold.py): the same function up to float rounding. False for runs written before the field
    # existed, as they trained
    teacher: Optional[dict] = None  # {"source": "file", "path", "arch", "dtype"} | {"source": "trained", "arch",
    # "dir", "dtype"}; "dtype" (TEACHER_DTYPES): the teacher's forward, "fp32" where absent (older runs)
    teacher_run: Optional[dict] = None  # the self-trained teacher's own Config, as a dict
    nat_teacher: Optional[dict] = None  # MTARD's naturally trained teacher (--nat-teacher): {"path", "arch",
    # "sha256"}, in the teacher's dtype; None for every other method and for runs written before the field
    schedule_source: str = ""  # where the method's official schedule comes from
    dataset: str = "cifar10"  # data.NAMES; every model has its class count; "cifar10" for runs written
    # before the field existed, as they trained
    wrn70_16_norm: str = "cifar10"  # the mean/std every WRN-70-16 of the run normalizes with
    # (models.WRN70_NORMS; the official RSLAD code's CIFAR-10 constants by default, models/wrn_dm.py)
    val_n: Optional[int] = None  # --val-n: N training images held out (never trained on) for the per-epoch
    # evaluation and best.pt (engine/validation.py); None: the first eval_n test images, as before the field
    best_selection: str = "test-subset"  # what picks best.pt (validation.SELECTIONS): "test-subset" (the
    # default, the official RSLAD script's habit, resnet18_rslad_cifar10.py) or "validation" (--val-n)
    tensorboard: bool = False  # --tensorboard: RUN_DIR/tensorboard/ event files of metrics.jsonl's scalars
    # (engine/tb_log.py); False for runs written before the field existed
    versions: dict = field(default_factory=dict)
    format: int = CONFIG_FORMAT

    def to_dict(self) -> dict:
        """Plain JSON types only (a JSON round trip): what config.json holds and what checkpoints embed,
        so that checkpoints stay weights_only-loadable and compare equal to a config read back from disk."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def held_n(self) -> int:
        """The images the per-epoch evaluation attacks: the --val-n held-out training images, else the first
        eval_n test images."""
        return self.val_n if self.val_n is not None else self.eval_n

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
    _check(
        cfg.val_n is None or (_is_int(cfg.val_n) and cfg.val_n >= 1),
        f"--val-n must be an integer >= 1, got {cfg.val_n!r}",
    )
    _check(
        cfg.best_selection == selection_of(cfg.val_n),
        f"best_selection {cfg.best_selection!r} does not match val_n {cfg.val_n!r}",
    )
    _check(isinstance(cfg.tensorboard, bool), f"tensorboard must be true or false, got {cfg.tensorboard!r}")
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
    _check(isinstance(cfg.fold_bn, bool), f"fold_bn must be true or false, got {cfg.fold_bn!r}")
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
    _check(
        cfg.nat_teacher is None
        or (isinstance(cfg.nat_teacher, dict) and {"path", "arch"} <= set(cfg.nat_teacher) and cfg.teacher is not None),
        f"nat_teacher must be a mapping with path and arch beside a teacher, got {cfg.nat_teacher!r}",
    )
    ea = cfg.eval_attack
    _check(0 <= ea["eps"] <= 1, f"evaluation eps must be in [0, 1], got {ea['eps']}")


def same_run(a: dict, b: dict) -> bool:
    """Whether two config dicts describe the same run: a config written before a field existed reads as
    having the field's default; the library versions may differ (a resume after an upgrade)."""

    def norm(d):
        try:
            return Config.from_dict(dict(d)).to_dict()
        except (UserError, TypeError):
            return d

    ignore = ("versions",)
    a, b = norm(a), norm(b)
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
