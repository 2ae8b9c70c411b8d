"""The interface every training method implements, and the registry that holds them.

A method is a small class: its hyperparameters (with the official code's defaults, cited next to each
value), the objective of its inner maximization (`objective`, defined once: `attack` climbs it and
`attack_objective` evaluates it, so tests can check the attack raises it), the attack (`attack`) and its
outer loss (`loss`, or `loss_at` for a given x'). The training engine knows nothing else about a method: it
builds SGD from `SCHEDULE` (via `official_setting(student, dataset)`, which for MART picks the official setting of
the student's architecture), decays the lr at `milestones()`, calls `loss` once per batch and steps the
optimizer.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..attacks.pgd import model_mode
from ..errors import UserError


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: default value, unit/meaning, and where the default comes from."""

    default: object
    help: str


@dataclass(frozen=True)
class Schedule:
    """The optimizer and lr schedule of the method's official code (SGD with momentum, step decays).

    milestones follow torch's MultiStepLR convention with epochs counted from 0: the lr is multiplied by
    gamma before training epoch m, i.e. after m completed epochs. Codes that count epochs from 1 and test
    `epoch >= 75` before training (TRADES, MART) therefore have milestone 74. Use `Method.milestones()`,
    not this field, for the decays that actually happen (ARD's and IAD's lr bug).
    """

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
    under inference_mode, or served by the teacher-logit cache from the same view's earlier forward (None for
    methods without a teacher). epoch counts from 0.
    student / attack_model: the training forwards (the ones the loss backpropagates into the parameters) go
    through `student`, which under torchrun is the DistributedDataParallel wrapper; the attack and every
    no-grad pass go through `attack_model`, the plain module (never a DDP wrapper), so that the attack's
    input-gradient passes trigger no gradient all-reduce and the CUDA-graph loop captures plain kernels.
    `attack_model` defaults to `student` (a single process: one and the same module).
    stats: filled by `loss` with detached 0-dim tensors (not Python floats, so that logging them costs no
    device sync per batch); `float(v)` turns one into a number.
    """

    student: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    teacher: Optional[torch.nn.Module] = None
    teacher_logits: Optional[torch.Tensor] = None
    epoch: int = 0
    generator: Optional[torch.Generator] = None
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    attack_model: Optional[torch.nn.Module] = None

    def __post_init__(self):
        if self.attack_model is None:
            self.attack_model = self.student


class Method:
    """Base class. Subclasses set `name`, `needs_teacher`, `HPARAMS`, `SCHEDULE` and implement `objective`,
    `attack` and `loss_at`. Hyperparameters are attributes (`self.beta`, `self.eps`, ...)."""

    name: str = ""
    needs_teacher: bool = False
    # True when the official loss is a mean over the B*C logits rather than over the B images (RSLAD's):
    # presets too short to absorb the resulting 1/C gradient scale compensate (engine.config.resolve).
    LOSS_PER_ELEMENT: bool = False
    # True when the teacher sees nothing but the natural augmented batch (ctx.teacher_logits, T(x)): then
    # --teacher-cache auto caches it (engine/teacher_cache.py). The cache only ever serves ctx.teacher_logits;
    # a method that also calls ctx.teacher on other inputs (IAD's T(x')) leaves this False, and `on` still
    # caches its T(x) part.
    TEACHER_CACHE_AUTO: bool = False
    HPARAMS: Dict[str, HParam] = {}
    # data set -> the hyperparameters whose official value differs there (RSLAD's CIFAR-100 scripts scale
    # the loss); every other data set trains with the HPARAMS defaults
    DATASET_DEFAULTS: Dict[str, Dict[str, object]] = {}
    SCHEDULE: Schedule = Schedule(epochs=1, lr=0.1, milestones=())
    # How the attack runs (attacks.pgd.pgd's `mode` and `start`): the model's mode during the attack and
    # `attack_objective` ("eval", or "train" as in ARD's code; SAT makes it a hyperparameter), and the random
    # start ("uniform" in the eps ball, or "normal": x + init_std*N(0,1), with the method's `init_std`).
    attack_mode: str = "eval"
    attack_start: str = "uniform"
    has_attack: bool = True  # False: no inner maximization (natural training): nothing to fold for

    def __init__(self, **overrides):
        unknown = set(overrides) - set(self.HPARAMS)
        if unknown:
            raise UserError(
                f"method '{self.name}' has no hyperparameter(s) {sorted(unknown)}; it has {sorted(self.HPARAMS)}"
            )
        for key, hp in self.HPARAMS.items():
            value = overrides.get(key)
            setattr(self, key, hp.default if value is None else value)
        self.validate()

    @classmethod
    def official_setting(cls, student: str, dataset: str = "cifar10") -> Tuple[Schedule, Dict[str, object]]:
        """The official schedule and hyperparameter defaults for training a `student` (canonical architecture
        name) on `dataset` (data.NAMES): what the engine resolves a run from, before presets and command-line
        values. One setting for every architecture by default, with `DATASET_DEFAULTS` applied; a method
        whose official code has several (MART) overrides this."""
        defaults = {key: hp.default for key, hp in cls.HPARAMS.items()}
        return cls.SCHEDULE, {**defaults, **cls.DATASET_DEFAULTS.get(dataset, {})}

    def per_image_factor(self, num_classes: int) -> float:
        """How many times the loss its per-image form is (the per-image form: summed over the classes,
        averaged over the images): `num_classes` for a loss averaged over the B*C logits
        (`LOSS_PER_ELEMENT`), 1 otherwise. The quick preset's `per_image_loss_lr` multiplies the lr by it
        and divides the weight decay by it."""
        return float(num_classes) if self.LOSS_PER_ELEMENT else 1.0

    def validate(self) -> None:
        """Raise UserError on out-of-range hyperparameters (eps outside [0, 1], negative steps, ...)."""

    def hparams(self) -> Dict[str, object]:
        return {key: getattr(self, key) for key in self.HPARAMS}

    def objective(self, ctx: Context) -> Callable[[torch.Tensor], torch.Tensor]:
        """The scalar function of the attacked model's logits that `attack` maximizes for this batch."""
        raise NotImplementedError

    def attack(self, ctx: Context) -> Optional[torch.Tensor]:
        """The inner maximization: x' for this batch (None for methods without one). PGD methods call
        `pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))`."""
        return None

    def pgd_settings(self, ctx: Context) -> Dict[str, object]:
        """attacks.pgd.pgd's keyword arguments for this method's attack: its budget, start and mode, and the
        batch's generator."""
        settings = dict(
            eps=self.eps,
            alpha=self.step_size,
            steps=self.steps,
            start=self.attack_start,
            mode=self.attack_mode,
            generator=ctx.generator,
        )
        if self.attack_start == "normal":
            settings["init_std"] = self.init_std
        return settings

    def attack_objective(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        """`objective` evaluated at x_adv, with the model in the attack's mode; it leaves no trace (a
        train-mode forward's BatchNorm statistics are put back).

        Both run on `ctx.attack_model`; the training forwards of `loss_at` on `ctx.student`."""
        model = ctx.attack_model
        with model_mode(model, self.attack_mode), preserved_buffers(model), torch.no_grad():
            return self.objective(ctx)(model(x_adv))

    def loss(self, ctx: Context) -> torch.Tensor:
        """The outer loss for this batch, attack included. The student is in train mode on entry.

        By default: `loss_at(ctx, attack(ctx))`."""
        return self.loss_at(ctx, self.attack(ctx))

    def loss_at(self, ctx: Context, x_adv: Optional[torch.Tensor]) -> torch.Tensor:
        """The outer loss for this batch at a given x' (None for methods without an attack)."""
        raise NotImplementedError

    def after_epoch(self, epoch: int, student: torch.nn.Module, batches) -> Optional[torch.nn.Module]:
        """Called by the runner after epoch ``epoch``'s training (from 0), before its evaluation, with the plain
        student and ``batches()``, an iterable of augmented training images. A method that keeps a second model
        of the student's architecture (PeerAiD's SWA student) updates it here and returns it: the runner then
        evaluates it beside the student and saves it as swa_best.pt / swa_last.pt. None by default."""
        return None

    def milestones(self) -> Tuple[int, ...]:
        """The epochs (from 0, MultiStepLR convention, see `Schedule`) at which the lr really decays.

        SCHEDULE.milestones by default; ARD and IAD return only the first one when their `lr_bug` flag
        reproduces the official codes' bug (the second decay never happens)."""
        return tuple(self.SCHEDULE.milestones)

    def lr_at(self, epoch: int, base_lr: Optional[float] = None) -> float:
        """The lr of epoch `epoch` (from 0) under `milestones()`: base_lr * gamma**(milestones <= epoch)."""
        lr = self.SCHEDULE.lr if base_lr is None else base_lr
        return lr * self.SCHEDULE.gamma ** sum(1 for m in self.milestones() if epoch >= m)


def pgd_hparams(eps, step_size, steps, init_std=None) -> Dict[str, HParam]:
    """The attack budget's hyperparameters, each given as (default, where the official code sets it);
    `init_std` for the methods whose attack starts at x + init_std*N(0,1)."""
    out = {
        "eps": HParam(eps[0], f"l_inf radius, inputs in [0, 1] ({eps[1]})"),
        "step_size": HParam(step_size[0], f"PGD step ({step_size[1]})"),
        "steps": HParam(steps[0], f"PGD steps ({steps[1]})"),
    }
    if init_std is not None:
        out["init_std"] = HParam(init_std[0], f"std of the Gaussian start x + init_std*N(0,1) ({init_std[1]})")
    return out


# Hyperparameter checks for `validate()`: each returns the value coerced to its type (numeric strings
# from a command line are accepted) or raises UserError naming the method and the hyperparameter.


def _number(method: str, name: str, value) -> float:
    if isinstance(value, bool):
        raise UserError(f"method '{method}': {name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"method '{method}': {name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise UserError(f"method '{method}': {name} must be finite, got {value!r}")
    return out


def check_range(
    method: str, name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False
) -> float:
    """A finite number in [lo, hi] ((lo, hi] with lo_open)."""
    out = _number(method, name, value)
    if out < lo or out > hi or (lo_open and out == lo):
        left = "(" if lo_open else "["
        raise UserError(f"method '{method}': {name} must be in {left}{lo}, {hi}], got {value!r}")
    return out


def check_count(method: str, name: str, value, minimum: int = 0) -> int:
    """An integer >= minimum (10 and 10.0 pass, 2.5 does not)."""
    out = _number(method, name, value)
    if out != int(out) or out < minimum:
        raise UserError(f"method '{method}': {name} must be an integer >= {minimum}, got {value!r}")
    return int(out)


def check_flag(method: str, name: str, value) -> bool:
    """True/False (also 0/1 and the strings true/false/yes/no/1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise UserError(f"method '{method}': {name} must be true or false, got {value!r}")


def check_attack(method: Method) -> None:
    """The attack hyperparameters of `pgd_hparams`: `eps`, `step_size`, `steps` (inputs live in [0, 1]) and
    `init_std` where the method has it."""
    method.eps = check_range(method.name, "eps", method.eps, 0.0, 1.0)
    method.step_size = check_range(method.name, "step_size", method.step_size, 0.0)
    method.steps = check_count(method.name, "steps", method.steps)
    if "init_std" in method.HPARAMS:
        method.init_std = check_range(method.name, "init_std", method.init_std, 0.0)


REGISTRY: Dict[str, type] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type:
    if not isinstance(name, str):
        raise UserError(f"method name must be a string, got {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    key = name.strip().lower().replace("-", "_")
    key = {"madry": "sat", "pgd_at": "sat", "pgdat": "sat", "at": "sat", "nat": "natural", "standard": "natural"}.get(
        key, key
    )
    if key not in REGISTRY:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


# Small helpers shared by the method modules.


def teacher_logits(ctx: Context) -> torch.Tensor:
    """ctx.teacher_logits, or T(x) computed here (teacher in eval mode, no_grad) when the engine left it
    None but gave the teacher."""
    if ctx.teacher_logits is not None:
        return ctx.teacher_logits.detach()
    if ctx.teacher is None:
        raise ValueError("this method needs the teacher: the Context has neither teacher_logits nor teacher")
    with model_mode(ctx.teacher, "eval"), torch.no_grad():
        return ctx.teacher(ctx.x)


def cross_entropy_objective(ctx: Context) -> Callable[[torch.Tensor], torch.Tensor]:
    """CE(logits, y) on the batch's labels: the objective of SAT's, MART's and ARD's (IAD's) attacks."""
    y = ctx.y
    return lambda logits: F.cross_entropy(logits, y)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 logits (autocast) to float32 for the loss arithmetic around softmax_kl, which takes
    them as they are (it casts under autocast itself); other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct top-1 predictions, as a detached 0-dim float tensor (no device sync)."""
    return (logits.detach().argmax(dim=1) == y).float().mean()


class preserved_buffers:
    """Context manager: the model's buffers (BatchNorm running statistics, counters) are restored on exit,
    so that evaluating an objective in train mode leaves no trace."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, value in self.saved:
                b.copy_(value)
        return False
