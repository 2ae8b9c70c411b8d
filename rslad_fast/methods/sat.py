"""SAT: standard adversarial training (Madry et al., ICLR 2018): CE(f(x'), y) with x' from PGD-10.

Official code: MadryLab/cifar10_challenge (TensorFlow), `config.json` and `pgd_attack.py`: eps 8/255,
10 steps of 2/255, uniform random start, CE ("xent") loss; SGD momentum 0.9, weight decay 2e-4, batch 128,
lr 0.1 -> 0.01 at step 40k -> 0.001 at step 60k, 80k steps.

The attack runs with the model in eval mode by default, the convention of the PyTorch codes of this lineage
(TRADES, MART, RSLAD). Madry's TF code builds its attack on `Model(mode='train')`, i.e. BatchNorm in training
mode; `attack_mode="train"` reproduces that.
"""

import torch
import torch.nn.functional as F

from ..attacks.pgd import pgd
from ..errors import UserError
from .base import (
    Context,
    HParam,
    Method,
    Schedule,
    accuracy,
    check_attack,
    cross_entropy_objective,
    pgd_hparams,
    register,
)


@register
class SAT(Method):
    """Madry PGD adversarial training: loss CE(f(x'), y), x' = PGD-10 on CE from a uniform start."""

    name = "sat"
    needs_teacher = False
    HPARAMS = {
        **pgd_hparams(
            eps=(8 / 255, 'Madry cifar10_challenge config.json "epsilon": 8.0 on the 0-255 scale'),
            step_size=(2 / 255, 'Madry config.json "step_size": 2.0 on the 0-255 scale'),
            steps=(10, 'Madry config.json "num_steps": 10'),
        ),
        "attack_mode": HParam(
            "eval",
            "model mode during the attack: 'eval' (default; the PyTorch convention "
            "of TRADES/MART/RSLAD) or 'train' (Madry's TF train.py attacks "
            "Model(mode='train'): BatchNorm in training mode)",
        ),
    }
    SCHEDULE = Schedule(
        epochs=205,
        lr=0.1,
        milestones=(102, 154),
        weight_decay=2e-4,
        batch_size=128,
        source="Madry cifar10_challenge config.json: 80000 steps of batch 128 (390.6 steps/epoch = 204.8 "
        "epochs), step_size_schedule [[0, 0.1], [40000, 0.01], [60000, 0.001]] (epochs 102.4 and "
        "153.6), weight_decay 2e-4, momentum 0.9",
    )

    def validate(self) -> None:
        check_attack(self)
        if self.attack_mode not in ("eval", "train"):
            raise UserError(f"method 'sat': attack_mode must be 'eval' or 'train', got {self.attack_mode!r}")

    def objective(self, ctx: Context):
        return cross_entropy_objective(ctx)

    def attack(self, ctx: Context) -> torch.Tensor:
        return pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        logits_adv = ctx.student(x_adv)
        loss = F.cross_entropy(logits_adv, ctx.y)
        ctx.stats.update(loss=loss.detach(), loss_adv=loss.detach(), acc_adv=accuracy(logits_adv, ctx.y))
        return loss
