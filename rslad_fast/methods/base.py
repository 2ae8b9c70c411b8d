"""The interface every training method implements, and the registry that holds them.

A method is a small class: its hyperparameters (with the official code's defaults, cited next to each
value), its inner maximization (`attack`), the objective that attack maximizes (`attack_objective`, so tests
can check the attack raises it), and its outer loss (`loss`). The training engine knows nothing else about
a method: it calls `loss` once per batch and steps the optimizer.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..errors import UserError


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: default value, unit/meaning, and where the default comes from."""
    default: object
    help: str


@dataclass(frozen=True)
class Schedule:
    """The optimizer and lr schedule of the method's official code (SGD with momentum, step decays)."""
    epochs: int
    lr: float
    milestones: Tuple[int, ...]
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128
    source: str = ""


@dataclass
class Context:
    """What a method sees of one training batch.

    teacher_logits: T(x) on the natural batch, computed once by the engine with the teacher in eval mode
    under no_grad (None for methods without a teacher). epoch counts from 0.
    """
    student: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    teacher: Optional[torch.nn.Module] = None
    teacher_logits: Optional[torch.Tensor] = None
    epoch: int = 0
    generator: Optional[torch.Generator] = None
    stats: Dict[str, float] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set `name`, `needs_teacher`, `HPARAMS`, `SCHEDULE` and implement the three
    methods below. Hyperparameters are attributes (`self.beta`, `self.eps`, ...)."""

    name: str = ""
    needs_teacher: bool = False
    HPARAMS: Dict[str, HParam] = {}
    SCHEDULE: Schedule = Schedule(epochs=1, lr=0.1, milestones=())

    def __init__(self, **overrides):
        unknown = set(overrides) - set(self.HPARAMS)
        if unknown:
            raise UserError(f"method '{self.name}' has no hyperparameter(s) {sorted(unknown)}; it has "
                            f"{sorted(self.HPARAMS)}")
        for key, hp in self.HPARAMS.items():
            value = overrides.get(key)
            setattr(self, key, hp.default if value is None else value)
        self.validate()

    def validate(self) -> None:
        """Raise UserError on out-of-range hyperparameters (eps outside [0, 1], negative steps, ...)."""

    def hparams(self) -> Dict[str, object]:
        return {key: getattr(self, key) for key in self.HPARAMS}

    def attack(self, ctx: Context) -> Optional[torch.Tensor]:
        """The inner maximization: x' for this batch (None for methods without one)."""
        return None

    def attack_objective(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        """The scalar `attack` maximizes, evaluated at x_adv (with the model in the attack's mode)."""
        raise NotImplementedError

    def loss(self, ctx: Context) -> torch.Tensor:
        """The outer loss for this batch, attack included. The student is in train mode on entry."""
        raise NotImplementedError


REGISTRY: Dict[str, type] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type:
    key = name.strip().lower().replace("-", "_")
    key = {"madry": "sat", "pgd_at": "sat", "pgdat": "sat", "at": "sat", "nat": "natural", "standard": "natural"}.get(key, key)
    if key not in REGISTRY:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]
