"""What a user asks of one training run, before resolution: :class:`RunSettings`, every field None (or empty)
where not given. The command lines (``train``, ``reproduce``) fill one from their flags; tests and code that
drive the engine build one directly; ``resolve.resolve`` turns it into the run's :class:`Config`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RunSettings:
    student: Optional[str] = None  # architecture (models.ARCHS); default resnet18
    method: Optional[str] = None  # methods.REGISTRY name; default rslad
    preset: Optional[str] = None  # presets.PRESETS name; default paper
    hparams: dict = field(default_factory=dict)  # the method hyperparameters given, by name
    teacher: Optional[str] = None  # a teacher checkpoint file; None: distillation trains its own
    teacher_arch: Optional[str] = None
    nat_teacher: Optional[str] = None  # MTARD's second, naturally trained teacher: a checkpoint file
    nat_teacher_arch: Optional[str] = None
    teacher_dtype: Optional[str] = None
    teacher_cache: Optional[str] = None
    wrn70_16_norm: Optional[str] = None
    dataset: Optional[str] = None
    data: Optional[str] = None
    train_n: Optional[int] = None
    eval_n: Optional[int] = None
    val_n: Optional[int] = None  # --val-n: held-out training images pick best.pt (engine/validation.py)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    milestones: Optional[list] = None
    gamma: Optional[float] = None
    seed: Optional[int] = None
    device: Optional[str] = None
    loader: Optional[str] = None
    threads: Optional[int] = None
    amp: Optional[str] = None
    channels_last: Optional[bool] = None
    allow_tf32: Optional[bool] = None
    sync_bn: Optional[bool] = None
    fold_bn: Optional[bool] = None
    tensorboard: Optional[bool] = None  # --tensorboard: the per-epoch scalars as TensorBoard events

    # the settings only a distillation run takes
    TEACHER_ONLY = ("teacher", "teacher_arch", "teacher_dtype", "teacher_cache")

    def replace(self, **changes) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    def for_method(self, method_cls) -> "RunSettings":
        """What of these settings applies to a run of ``method_cls``: its own hyperparameters, and the
        teacher's settings only for a distillation method (a sweep's flags go to every run they apply to)."""
        s = self.replace(hparams={k: v for k, v in self.hparams.items() if k in method_cls.HPARAMS})
        if not method_cls.needs_teacher:
            s = s.replace(**{k: None for k in self.TEACHER_ONLY})
        if not getattr(method_cls, "needs_nat_teacher", False):  # MTARD's second teacher: its runs only
            s = s.replace(nat_teacher=None, nat_teacher_arch=None)
        return s

    def given(self) -> dict:
        """The settings given, as {name: value}; a method hyperparameter as ``hp_<name>`` (the form
        ``reproduce``'s plan.json has recorded them in since its first version)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "hparams" and getattr(self, f.name) is not None
        }
        out.update({f"hp_{k}": v for k, v in self.hparams.items() if v is not None})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
