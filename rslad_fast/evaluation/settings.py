"""What one evaluation is asked to do: :class:`EvalSettings`, the typed form of ``evaluate``'s flags (each
default the official evaluation codes' or the flag's), built by the command line and by ``reproduce``.
``to_dict()`` is the flat form eval.json's ``config`` records (one key per flag, as it always has)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from rslad_fast.attacks.eval_attacks import INIT_STD
from rslad_fast.attacks.registry import EVAL_ATTACKS

from .robustness import ATTACKS

DEFAULT_DATA = "./data"  # --data where neither the flag nor a run's config.json names a folder


class DefaultN(int):
    """--n's default, told apart from the same number given (an explicit n larger than the test set is an
    error; the default shrinks to it)."""


def flag_dest(entry, hparam: str) -> str:
    """The key of an attack's own hyperparameter (``--pgd-sat-steps`` -> ``pgd_sat_steps``)."""
    return f"{entry.flag_prefix}_{hparam}".replace("-", "_")


def default_attack_hparams() -> dict:
    """Every attack's own hyperparameters at their defaults (the official evaluation codes'), by key."""
    return {flag_dest(e, hp): e.default(hp) for e in EVAL_ATTACKS.values() for hp in e.flags}


@dataclass
class EvalSettings:
    run: Optional[str] = None  # a run directory: its best.pt and last.pt
    ckpt: Optional[str] = None  # or one checkpoint file (needs arch)
    arch: Optional[str] = None
    attacks: list = field(default_factory=lambda: list(ATTACKS))
    n: int = DefaultN(10000)  # the first n test images
    batch_size: int = 250  # AutoAttack's default, for every attack (memory only)
    device: Optional[str] = None  # None: cuda if available
    seed: int = 0
    dataset: Optional[str] = None  # None: the run's (config.json), else cifar10
    data: Optional[str] = None  # None: the run's data folder (config.json), else DEFAULT_DATA
    no_download: bool = False
    wrn70_16_norm: Optional[str] = None  # None: the run's, else cifar10
    eps: float = 8 / 255
    out: Optional[str] = None  # None: the run dir, or the checkpoint's folder
    tolerance: float = 0.5  # accuracy points Clean >= FGSM >= PGD >= AA may be broken before it is flagged
    allow_tf32: bool = False
    no_progress: bool = False
    verbose: bool = False
    init_std: float = INIT_STD
    sanity: bool = False
    sanity_eps: float = 1.0
    sanity_alpha: float = 0.1
    sanity_steps: int = 20
    attack_hparams: dict = field(default_factory=default_attack_hparams)  # flag_dest -> value

    def replace(self, **changes) -> "EvalSettings":
        return dataclasses.replace(self, **changes)

    def hparam(self, entry, hp: str):
        return self.attack_hparams.get(flag_dest(entry, hp), entry.default(hp))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "attack_hparams"}
        return {**d, **default_attack_hparams(), **self.attack_hparams}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSettings":
        """From the flat form (parsed flags; eval.json's config): an attack's own key goes to attack_hparams,
        a key of no field is dropped."""
        names = {f.name for f in dataclasses.fields(cls)} - {"attack_hparams"}
        hp_keys = set(default_attack_hparams())
        return cls(
            **{k: v for k, v in d.items() if k in names},
            attack_hparams={k: v for k, v in d.items() if k in hp_keys},
        )
