"""Natural (standard) training: cross-entropy on the clean batch. No attack, no teacher.

The RSLAD paper's "Natural" rows (RN-18 94.65 clean, 0.0 under PGD) come from plain training; the schedule
below is IAD's `pre_train/ST.py`, the standard-training script of the RSLAD lineage.
"""

import torch
import torch.nn.functional as F

from .base import Context, Method, Schedule, accuracy, register


@register
class Natural(Method):
    """CE(f(x), y) on clean data."""

    name = "natural"
    needs_teacher = False
    HPARAMS = {}
    SCHEDULE = Schedule(
        epochs=200,
        lr=0.1,
        milestones=(99, 149),
        weight_decay=2e-4,
        batch_size=128,
        source="IAD pre_train/ST.py: --epochs 200, --lr-max 0.1, --lr-schedule piecewise (x0.1 at 50% and "
        "75% of training; lr_schedule(epoch+1) makes that 0-based epochs 99 and 149), --wd 2e-4, "
        "momentum 0.9, batch 128",
    )

    has_attack = False

    def attack(self, ctx: Context):
        return None

    def loss_at(self, ctx: Context, x_adv=None) -> torch.Tensor:
        logits = ctx.student(ctx.x)
        loss = F.cross_entropy(logits, ctx.y)
        ctx.stats.update(loss=loss.detach(), loss_nat=loss.detach(), acc_nat=accuracy(logits, ctx.y))
        return loss
