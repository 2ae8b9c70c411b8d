"""MART (Wang et al., ICLR 2020): boosted CE on x' plus a KL term weighted by the natural misclassification.

Official code: YisenWang/MART, `mart.py` (`mart_loss`), `train_wideresnet.py`, `train_resnet.py`.
- Attack: model in eval mode; start x + 0.001*N(0,1); 10 sign steps of 0.007 in the eps = 0.031 ball
  (~ 8/255), projection and clamp to [0, 1] after each; objective CE(f(x'), y).
- Loss, model in train mode, p = softmax:
      CE(f(x'), y) + NLL(log(1.0001 - p_adv + 1e-12), y_wrong)
      + beta * (1/B) * sum_i [sum_c KL(p_nat || p_adv)]_i * (1.0000001 - p_nat[i, y_i])
  y_wrong = the most likely class under p_adv other than y. Nothing is detached (p_nat and p_nat[i, y_i]
  carry gradients, as in the official code). The official KL uses log(p_adv + 1e-12); the exact
  log_softmax here differs by less than 1e-11 per element.
- Two official settings, chosen by the student's architecture (`official_setting`, used by the engine):
  train_wideresnet.py trains WideResNet with beta = 6, lr 0.1, weight decay 7e-4, 90 epochs;
  train_resnet.py trains ResNet18 with beta = 5, lr 0.01, weight decay 3.5e-3, 120 epochs. Both: SGD
  momentum 0.9, batch 128, the same attack, lr x0.1 at epoch >= 75, 90, 100 (epochs from 1).
  The WRN setting goes to every WideResNet of models.ARCHS, by family (`is_wide`: the canonical names with
  "wrn": wrn34-10, wrn70-16, wrn34-20, dm-wrn28-10, dm-wrn70-16, and any WRN added later), the ResNet
  setting to every other student: resnet18 is train_resnet.py's own model, resnet8 and resnet56 smaller
  ResNets. MART's code has no setting for
  MobileNetV2 or for our test CNN (`tiny`); they are small, non-wide networks like ResNet-18, and the RSLAD
  lineage trains its ResNet-18 and MobileNetV2 students with one setting, so they take the ResNet one.
  Explicit --beta/--lr/--weight-decay/--epochs override either. The class attributes (HPARAMS, SCHEDULE)
  hold the WRN setting; `RESNET_SCHEDULE` and `RESNET_BETA` the other.
"""

import torch
import torch.nn.functional as F

from .. import ops
from ..attacks.pgd import pgd
from ..models import canonical_name
from .base import (
    Context,
    HParam,
    Method,
    Schedule,
    accuracy,
    check_attack,
    check_range,
    cross_entropy_objective,
    pgd_hparams,
    register,
    upcast,
)


@register
class MART(Method):
    """MART: BCE(f(x'), y) + beta * mean_i KL(p_nat || p_adv)_i * (1 - p_nat[i, y_i])."""

    name = "mart"
    needs_teacher = False
    attack_start = "normal"  # x + init_std*N(0,1) (mart.py)
    HPARAMS = {
        **pgd_hparams(
            eps=(0.031, "0.031 ~ 8/255; MART train_wideresnet.py --epsilon 0.031"),
            step_size=(0.007, "MART train_wideresnet.py --step-size 0.007"),
            steps=(10, "MART train_wideresnet.py --num-steps 10"),
            init_std=(0.001, "MART mart.py `0.001 * torch.randn`"),
        ),
        "beta": HParam(
            6.0,
            "weight of the misclassification-aware KL term (MART train_wideresnet.py --beta "
            "6.0 for WRN students; train_resnet.py --beta 5.0 for ResNet-18, the default of "
            "every non-WRN student)",
        ),
    }
    SCHEDULE = Schedule(
        epochs=90,
        lr=0.1,
        milestones=(74, 89, 99),
        weight_decay=7e-4,
        batch_size=128,
        source="MART train_wideresnet.py (WRN students): --epochs 90, --lr 0.1, --wd 7e-4, momentum 0.9, "
        "--batch-size 128, --beta 6.0; adjust_learning_rate x0.1 at epoch >= 75, 90, 100 counting epochs "
        "from 1 (0-based milestones 74, 89, 99)",
    )
    RESNET_SCHEDULE = Schedule(
        epochs=120,
        lr=0.01,
        milestones=(74, 89, 99),
        weight_decay=3.5e-3,
        batch_size=128,
        source="MART train_resnet.py (ResNet-18; every non-WRN student): --epochs 120, --lr 0.01, --wd 3.5e-3, "
        "momentum 0.9, --batch-size 128, --beta 5.0; adjust_learning_rate x0.1 at epoch >= 75, 90, 100 "
        "counting epochs from 1 (0-based milestones 74, 89, 99)",
    )
    RESNET_BETA = 5.0  # MART train_resnet.py --beta 5.0

    @staticmethod
    def is_wide(student: str) -> bool:
        """A WideResNet student, which gets train_wideresnet.py's setting: by family, every architecture whose
        canonical name (models.ARCHS) names a WRN, whatever its depth, width or layout."""
        return "wrn" in canonical_name(student)

    @classmethod
    def official_setting(cls, student: str, dataset: str = "cifar10"):
        schedule, defaults = super().official_setting(student, dataset)
        if cls.is_wide(student):
            return schedule, defaults
        return cls.RESNET_SCHEDULE, dict(defaults, beta=cls.RESNET_BETA)

    def validate(self) -> None:
        check_attack(self)
        self.beta = check_range(self.name, "beta", self.beta, 0.0)

    def objective(self, ctx: Context):
        return cross_entropy_objective(ctx)

    def attack(self, ctx: Context) -> torch.Tensor:
        return pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        y = ctx.y
        logits_nat = upcast(ctx.student(ctx.x))
        logits_adv = upcast(ctx.student(x_adv))
        p_adv = F.softmax(logits_adv, dim=1)
        top2 = torch.argsort(p_adv, dim=1)[:, -2:]
        y_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), y_wrong)
        p_true = F.softmax(logits_nat, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        kl = ops.softmax_kl(logits_adv, logits_nat, reduction="none")  # KL(p_nat || p_adv) per sample
        loss_kl = (kl * (1.0000001 - p_true)).sum() / ctx.x.shape[0]
        loss = loss_adv + self.beta * loss_kl
        ctx.stats.update(
            loss=loss.detach(),
            loss_adv=loss_adv.detach(),
            loss_kl=loss_kl.detach(),
            acc_nat=accuracy(logits_nat, y),
            acc_adv=accuracy(logits_adv, y),
        )
        return loss
