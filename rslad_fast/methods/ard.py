"""ARD (Goldblum et al., AAAI 2020): distill the teacher's natural soft labels into the student's
adversarial outputs.

Official code: goldblum/AdversariallyRobustDistillation, `main.py`.
- Attack (`AttackPGD`): CE(S(x'), y) on the true labels, uniform start in the eps = 8/255 ball, 10 sign steps
  of 2/255, projection and clamp to [0, 1]. The student stays in TRAIN mode (`net.train()` wraps the attack),
  so BatchNorm normalizes with batch statistics and updates its running averages at every attack step.
- Loss: alpha * tau^2 * KLDivLoss()(log_softmax(S(x')/tau), softmax(T(x)/tau)) + (1-alpha) * CE(S(x), y),
  with KLDivLoss's default elementwise mean (over B*C), tau = 30, alpha = 1. T(x) is the teacher (eval
  mode) on the natural batch: ctx.teacher_logits. S(x) is always computed, as in the official code (with
  alpha = 1 it only feeds BatchNorm's running averages and the acc_nat statistic).
- Schedule: lr 0.1, x0.1 at epochs [100, 150] (from 0), 200 epochs, weight decay 2e-4, batch 128.

The lr bug: `adjust_learning_rate(optimizer, epoch, lr)` is always passed the original lr, so at epoch 150 it
sets 0.1 * 0.1 = 0.01 again: the second decay never happens. `lr_bug=False` (default) trains with both
decays; `lr_bug=True` reproduces the bug. The engine reads the decays that happen from `milestones()`
(or the lr of an epoch from `lr_at(epoch)`), never from SCHEDULE.milestones directly.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..attacks.pgd import pgd
from .base import (
    Context,
    HParam,
    Method,
    Schedule,
    accuracy,
    check_attack,
    check_flag,
    check_range,
    cross_entropy_objective,
    pgd_hparams,
    register,
    teacher_logits,
    upcast,
)


@register
class ARD(Method):
    """ARD: alpha * tau^2 * KL_mean(T^tau(x) || S^tau(x')) + (1-alpha) * CE(S(x), y)."""

    name = "ard"
    needs_teacher = True
    TEACHER_CACHE_AUTO = True  # the teacher sees only x: T(x) is a function of the view (engine/teacher_cache.py)
    attack_mode = "train"  # AttackPGD runs inside net.train()
    HPARAMS = {
        **pgd_hparams(
            eps=(8 / 255, "ARD main.py config 'epsilon': 8.0/255"),
            step_size=(2 / 255, "ARD main.py config 'step_size': 2.0/255"),
            steps=(10, "ARD main.py config 'num_steps': 10"),
        ),
        "tau": HParam(30.0, "distillation temperature (ARD main.py --temp 30.0)"),
        "alpha": HParam(1.0, "weight of the KL term; 1-alpha weighs CE(S(x), y) (ARD main.py --alpha 1.0)"),
        "lr_bug": HParam(
            False,
            "True reproduces ARD main.py's adjust_learning_rate bug (always given the "
            "original lr, so the decay at epoch 150 never happens and the lr stays "
            "0.01); False (default) applies both decays",
        ),
    }
    SCHEDULE = Schedule(
        epochs=200,
        lr=0.1,
        milestones=(100, 150),
        weight_decay=2e-4,
        batch_size=128,
        source="ARD main.py: --lr 0.1, --lr_schedule 100 150 (epochs from 0), --lr_factor 0.1, --epochs 200, "
        "SGD momentum 0.9, weight_decay 2e-4, batch 128",
    )

    def validate(self) -> None:
        check_attack(self)
        self.tau = check_range(self.name, "tau", self.tau, 0.0, lo_open=True)
        self.alpha = check_range(self.name, "alpha", self.alpha, 0.0, 1.0)
        self.lr_bug = check_flag(self.name, "lr_bug", self.lr_bug)

    def milestones(self) -> Tuple[int, ...]:
        """Both decays, or only the first with lr_bug=True (the official code's effective schedule)."""
        milestones = tuple(self.SCHEDULE.milestones)
        return milestones[:1] if self.lr_bug else milestones

    def objective(self, ctx: Context):
        return cross_entropy_objective(ctx)

    def attack(self, ctx: Context) -> torch.Tensor:
        return pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))

    def _distill(self, logits_adv, t_logits, reduction):
        """tau^2 * KL(T^tau(x) || S^tau(x')) with the given reduction."""
        return self.tau**2 * ops.softmax_kl(logits_adv, t_logits, self.tau, reduction)

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        t_logits = teacher_logits(ctx)
        logits_adv = ctx.student(x_adv)
        logits_nat = ctx.student(ctx.x)
        loss_kl = self._distill(logits_adv, t_logits, "mean")
        loss_nat = F.cross_entropy(upcast(logits_nat), ctx.y)
        loss = self.alpha * loss_kl + (1.0 - self.alpha) * loss_nat
        ctx.stats.update(
            loss=loss.detach(),
            loss_kl=loss_kl.detach(),
            loss_nat=loss_nat.detach(),
            acc_nat=accuracy(logits_nat, ctx.y),
            acc_adv=accuracy(logits_adv, ctx.y),
        )
        return loss
