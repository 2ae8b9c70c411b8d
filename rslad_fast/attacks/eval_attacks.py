"""The evaluation attacks of the paper's Table 2 (FGSM, PGD_SAT, PGD_TRADES, CW-inf), torchattacks-style; the
registry ``python -m rslad_fast.evaluate`` is built from is ``registry.py``.

Each attack is a small class: hyperparameters in ``__init__`` (defaults cited next to each value),
``__call__(model, x, y) -> x_adv``, and ``run(model, x, y) -> (x_adv, the model's predictions on it)``. All of
them run on the one shared PGD engine (``pgd.pgd``, the same code as the training attacks and the held-out
evaluation after every training epoch), in fp32, on inputs in [0, 1], with the model in ``eval()`` mode during
the attack and its own modes restored afterwards (``pgd(..., mode="eval")`` does that). eps is 8/255 for every
attack by default, AutoAttack included (``autoattack.py``).

:data:`registry.EVAL_ATTACKS` lists them in the table's order, with the natural images first and AutoAttack last: per
attack its name on the command line, its column, its place in the chain Clean >= FGSM >= PGD >= AA that the
report checks, and the hyperparameters that get a flag; ``evaluate`` derives its columns, checks and flags
(with these defaults) from it.

Sources of the settings:
- TRADES ``pgd_attack_cifar10.py`` (``_pgd_whitebox``): PGD-20, step 0.003, uniform(-eps, eps) start, CE
  -> "pgd20-trades" (TRADES evaluates at eps 0.031; here eps is 8/255 unless --eps says otherwise).
- IAD / FAT ``attack_generator.py`` (``eval_robust``, the RSLAD lineage's evaluation): FGSM = one step of
  eps; PGD-20 of 2/255 with a uniform start -> "pgd20-sat"; CW-inf = PGD-30 of 2/255 on ``cwloss`` (kappa
  50), uniform start -> "cw". IAD's ``basic_eval.py`` runs its FGSM with ``random=True`` (a uniform(-eps, eps)
  start, then the step of eps) although it prints "FGSM without Random Start"; our FGSM is the standard
  one, from x itself, by default, and takes that start with ``FGSM(random_start=True)``.

One documented difference: the engine never clamps the random start to [0, 1] before the first gradient
(TRADES' ``_pgd_whitebox`` convention); IAD's ``pgd`` clamps it first. The first step clamps in both, so
only where the first gradient is taken differs, for pixels within eps of 0 or 1.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from .pgd import STARTS, model_mode, pgd

EPS = 8 / 255  # every attack at eps 8/255 unless --eps; RSLAD/IAD/ARD/SAT evaluate at 8/255
INIT_STD = 0.001  # std of a "normal" start, x + init_std * N(0, 1) (TRADES, RSLAD); the defaults start uniform


def _check(eps: float, alpha: float, steps, start: str, init_std: float) -> None:
    """Same rules as pgd.check_budget, as UserError (bad flags are user input)."""
    if not (isinstance(eps, (int, float)) and 0 <= eps <= 1):
        raise UserError(f"eps must be in [0, 1] for inputs in [0, 1], got {eps}")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha < math.inf):  # NaN and inf fail too
        raise UserError(f"step size (alpha) must be a finite number >= 0, got {alpha}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserError(f"steps must be a non-negative integer, got {steps!r}")
    if start not in STARTS:
        raise UserError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if not 0 <= init_std < math.inf:
        raise UserError(f"init_std must be a finite number >= 0, got {init_std}")


def ce_loss(y: torch.Tensor):
    """CE summed over the batch (the sign step makes sum and the official mean identical in direction;
    the sum cannot underflow a per-image gradient by 1/B)."""
    return lambda logits: F.cross_entropy(logits.float(), y, reduction="sum")


def cw_loss(y: torch.Tensor, kappa: float = 50.0, num_classes: Optional[int] = None):
    """IAD/FAT ``attack_generator.cwloss`` (from CAT), summed over the batch:

    onehot = one_hot(y); real = sum(onehot*logits, 1); other = max((1-onehot)*logits - 1e4*onehot, 1)
    loss = -relu(real - other + kappa)
    """

    def loss(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        onehot = F.one_hot(y, num_classes or logits.shape[1]).to(logits.dtype)
        real = (onehot * logits).sum(1)
        other = ((1.0 - onehot) * logits - onehot * 10000.0).max(1)[0]
        return -torch.clamp(real - other + kappa, min=0.0).sum()

    return loss


class EvalAttack:
    """Base class: ``name``, ``eps`` (the threat model the evaluator checks), ``hparams()`` for the report,
    ``__call__`` for x_adv, ``run`` for x_adv and the predictions the accuracy is counted from."""

    name = ""
    eps = 0.0

    def hparams(self) -> Dict[str, object]:
        raise NotImplementedError

    def __call__(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def run(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
    ):
        """(x_adv, the model's predicted classes on x_adv), the model in eval mode."""
        x_adv = self(model, x, y, generator=generator)
        with torch.no_grad(), model_mode(model, "eval"):
            return x_adv, model(x_adv).argmax(1)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class Clean(EvalAttack):
    """The natural images themselves: the Clean column, and the first link of the ordering chain."""

    name = "clean"

    def hparams(self):
        return {}

    def __call__(self, model, x, y, generator=None):
        return x.detach()


class FGSM(EvalAttack):
    """One signed-gradient step of size eps on CE: ``pgd(steps=1, alpha=eps)``.

    By default from x itself, the standard FGSM (Goodfellow et al.). ``random_start=True`` starts from
    x + U(-eps, eps) instead, as IAD's ``basic_eval.py`` really runs it (``eval_robust(perturb_steps=1,
    step_size=8/255, random=True)``, printed as "FGSM without Random Start"); like every attack here, the
    start is not clamped to [0, 1] before the gradient (IAD's is)."""

    name = "fgsm"

    def __init__(self, eps: float = EPS, random_start: bool = False):
        if not isinstance(random_start, bool):
            raise UserError(f"FGSM random_start must be True or False, got {random_start!r}")
        _check(eps, eps, 1, "none", 0.0)
        self.eps, self.random_start = float(eps), random_start

    @property
    def start(self) -> str:
        return "uniform" if self.random_start else "none"

    def hparams(self):
        return {"eps": self.eps, "alpha": self.eps, "steps": 1, "start": self.start, "loss": "ce"}

    def __call__(self, model, x, y, generator=None):
        return pgd(
            model,
            x,
            ce_loss(y),
            eps=self.eps,
            alpha=self.eps,
            steps=1,
            start=self.start,
            mode="eval",
            generator=generator,
        )


class PGD(EvalAttack):
    """PGD on CE (Madry et al.). Defaults are "pgd20-sat": 20 steps of 2/255 from a uniform(-eps, eps) start
    (IAD ``eval_robust``); :func:`pgd20_trades` gives TRADES' 20 steps of 0.003. Also the held-out
    evaluation after every training epoch (``train.EVAL_ATTACK``: RSLAD's PGD-20)."""

    name = "pgd"
    loss = "ce"

    def __init__(
        self,
        eps: float = EPS,
        alpha: float = 2 / 255,
        steps: int = 20,
        start: str = "uniform",
        init_std: float = INIT_STD,
        *,
        name: str = "pgd",
    ):
        _check(eps, alpha, steps, start, init_std)
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.start, self.init_std = start, float(init_std)
        self.name = name

    def objective(self, y: torch.Tensor):
        """The loss PGD climbs, logits -> scalar."""
        return ce_loss(y)

    def hparams(self):
        out = {"eps": self.eps, "alpha": self.alpha, "steps": self.steps, "start": self.start, "loss": self.loss}
        if self.start == "normal":
            out["init_std"] = self.init_std
        return out

    def __call__(self, model, x, y, generator=None):
        return pgd(
            model,
            x,
            self.objective(y),
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            start=self.start,
            init_std=self.init_std,
            mode="eval",
            generator=generator,
        )


def pgd20_sat(
    eps: float = EPS, alpha: float = 2 / 255, steps: int = 20, start: str = "uniform", init_std: float = INIT_STD
) -> PGD:
    """PGD_SAT: 20 steps of 2/255, uniform start, CE (IAD ``eval_robust``; Madry et al.'s PGD)."""
    return PGD(eps, alpha, steps, start, init_std, name="pgd20-sat")


def pgd20_trades(
    eps: float = EPS, alpha: float = 0.003, steps: int = 20, start: str = "uniform", init_std: float = INIT_STD
) -> PGD:
    """PGD_TRADES: 20 steps of 0.003, uniform(-eps, eps) start, CE (TRADES ``pgd_attack_cifar10.py``,
    ``--num-steps 20 --step-size 0.003 --random``; TRADES' eps 0.031, ours 8/255 by default)."""
    return PGD(eps, alpha, steps, start, init_std, name="pgd20-trades")


class CWInf(PGD):
    """CW-inf: PGD on the CW margin loss with confidence kappa = 50, 30 steps of 2/255, uniform start
    (IAD ``eval_robust``: ``pgd(..., loss_fn="cw", num_steps=30, step_size=2/255, rand_init=True)``)."""

    name = "cw"
    loss = "cw"

    def __init__(
        self,
        eps: float = EPS,
        alpha: float = 2 / 255,
        steps: int = 30,
        kappa: float = 50.0,
        start: str = "uniform",
        init_std: float = INIT_STD,
    ):
        super().__init__(eps, alpha, steps, start, init_std, name="cw")
        if not kappa >= 0:
            raise UserError(f"CW confidence kappa must be >= 0, got {kappa}")
        self.kappa = float(kappa)

    def objective(self, y):
        return cw_loss(y, self.kappa)

    def hparams(self):
        return {**super().hparams(), "kappa": self.kappa}


__all__ = [
    "EPS",
    "INIT_STD",
    "EvalAttack",
    "Clean",
    "FGSM",
    "PGD",
    "CWInf",
    "pgd20_sat",
    "pgd20_trades",
    "ce_loss",
    "cw_loss",
]
