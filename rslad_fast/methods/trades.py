"""TRADES (Zhang et al., ICML 2019): CE(f(x), y) + beta * (1/B) * sum_i KL(f(x)_i || f(x')_i).

Official code: yaodongyu/TRADES, `trades.py` (`trades_loss`) and `train_trades_cifar10.py`.
- Attack: model in eval mode; start x + 0.001*N(0,1); 10 sign steps of 0.007 in the eps = 0.031 ball
  (0.031 ~ 8/255 = 0.03137; the official code uses 0.031 and so do we by default), each followed by the
  projection and a clamp to [0, 1]; objective KLDivLoss(sum)(log_softmax(f(x')), softmax(f(x))).
- Loss: CE(f(x), y) + beta * (1/B) * KLDivLoss(sum)(log_softmax(f(x')), softmax(f(x))), beta = 6, with the
  model back in train mode. The target f(x) is NOT detached: the gradient flows through both arguments.
  The official code runs f(x) twice in train mode (once for CE, once as the KL target); both give the same
  values, so one forward serves both here (the only difference: BatchNorm's running averages see the clean
  batch once instead of twice).
"""

import torch
import torch.nn.functional as F

from .. import ops
from ..attacks.pgd import model_mode, pgd
from .base import Context, HParam, Method, Schedule, accuracy, check_attack, check_range, pgd_hparams, register


@register
class TRADES(Method):
    """TRADES: natural CE plus beta times the batch-mean KL(f(x) || f(x')), attack on that KL."""

    name = "trades"
    needs_teacher = False
    attack_start = "normal"  # x + init_std*N(0,1) (trades.py)
    HPARAMS = {
        **pgd_hparams(
            eps=(0.031, "0.031 ~ 8/255; TRADES train_trades_cifar10.py --epsilon 0.031"),
            step_size=(0.007, "TRADES train_trades_cifar10.py --step-size 0.007"),
            steps=(10, "TRADES train_trades_cifar10.py --num-steps 10"),
            init_std=(0.001, "TRADES trades.py `0.001 * torch.randn`"),
        ),
        "beta": HParam(6.0, "weight of the KL term, 1/lambda (TRADES train_trades_cifar10.py --beta 6.0)"),
    }
    SCHEDULE = Schedule(
        epochs=76,
        lr=0.1,
        milestones=(74, 89, 99),
        weight_decay=2e-4,
        batch_size=128,
        source="TRADES train_trades_cifar10.py: --epochs 76 (the authors' early stop right after the first "
        "decay), --lr 0.1, --wd 2e-4, momentum 0.9, --batch-size 128; adjust_learning_rate x0.1 at "
        "epoch >= 75, 90, 100 counting epochs from 1 (0-based milestones 74, 89, 99)",
    )

    def validate(self) -> None:
        check_attack(self)
        self.beta = check_range(self.name, "beta", self.beta, 0.0)

    @staticmethod
    def _kl_sum(logits_adv, logits_nat):
        return ops.softmax_kl(logits_adv, logits_nat, reduction="sum")

    def objective(self, ctx: Context):
        with model_mode(ctx.attack_model, "eval"), torch.no_grad():
            target = ctx.attack_model(ctx.x)  # f(x) in eval mode: a constant during the attack, as in trades.py
        return lambda logits: self._kl_sum(logits, target)

    def attack(self, ctx: Context) -> torch.Tensor:
        return pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        logits_nat = ctx.student(ctx.x)
        logits_adv = ctx.student(x_adv)
        loss_nat = F.cross_entropy(logits_nat, ctx.y)
        loss_kl = self._kl_sum(logits_adv, logits_nat) / ctx.x.shape[0]  # target not detached
        loss = loss_nat + self.beta * loss_kl
        ctx.stats.update(
            loss=loss.detach(),
            loss_nat=loss_nat.detach(),
            loss_kl=loss_kl.detach(),
            acc_nat=accuracy(logits_nat, ctx.y),
            acc_adv=accuracy(logits_adv, ctx.y),
        )
        return loss
