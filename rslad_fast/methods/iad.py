"""IAD (Zhu et al., ICLR 2022, "Reliable adversarial distillation with unreliable teachers").

Official code: ZFancy/IAD, `IAD-I.py` (its attack, schedule and lr bug are ARD's; this class inherits them
from `ARD`).
- Attack: as ARD's: CE(S(x'), y), uniform start, 10 steps of 2/255, eps 8/255, student in TRAIN mode.
- Loss before epoch `begin` (60; epochs from 0, `if epoch >= args.begin`): the warm-up
      alpha * tau^2 * (1/B) * sum_i KL(T^tau(x) || S^tau(x'))_i + (1-alpha) * CE(S(x), y)
  i.e. ARD's loss written with IAD's reduction: the KL is summed over classes and averaged over the batch
  (KLDivLoss(reduce=False).sum(dim=1), times 1/len(outputs)), not ARD's mean over B*C.
- Loss from `begin` on, with A_i = softmax(T(x'))[i, y_i]^beta (teacher in eval mode on x', a constant:
  the official code takes `.item()`):
      alpha * tau^2 * (1/B) * sum_i KL(T^tau(x) || S^tau(x'))_i
      + alpha * (1/B) * sum_i (1 - A_i) * KL(S(x) || S(x'))_i + (1-alpha) * CE(S(x), y)
  S(x) is NOT detached (the official code feeds softmax(basic_net(inputs)) with its graph). This official
  form produced the published IAD numbers and is the default. The paper's Table 1 weighs the teacher term by
  A_i as well: `table1_form=True`.
- Defaults: tau = 1, alpha = 1, beta = 0.1, begin = 60; lr 0.1, x0.1 at [100, 150], 200 epochs, weight
  decay 2e-4, batch 128, with ARD's lr bug behind `lr_bug` (default False: both decays happen).
- Forwards (a deliberate difference): after the attack's final S(x'), the official loop runs an unused
  `basicop = basic_net(pert_inputs).detach()` and, from `begin` on, `basic_net(inputs)` twice (the self-KL
  target and the CE term; once before `begin`), all in train mode. Ours runs S(x') and S(x) once each:
  steps + 2 student forwards per training step where IAD-I.py runs steps + 3 (before `begin`) or steps + 4.
  The extra forwards give the same values, so the loss and every gradient are the same; only BatchNorm's
  running statistics, which eval mode uses, move fewer times and so differ slightly (as TRADES' note says
  of its doubled f(x)). tests/test_methods.py checks both.
"""

import dataclasses

import torch
import torch.nn.functional as F

from .. import ops
from ..attacks.pgd import model_mode
from .ard import ARD
from .base import (
    Context,
    HParam,
    accuracy,
    check_count,
    check_flag,
    check_range,
    pgd_hparams,
    register,
    teacher_logits,
    upcast,
)


@register
class IAD(ARD):
    """IAD: ARD-style warm-up, then the teacher term plus (1 - A_i) * KL(S(x) || S(x')) self-introspection."""

    name = "iad"
    needs_teacher = True
    # its teacher also sees x' (reliability, through ctx.teacher, never cached): --teacher-cache auto leaves
    # it off; `on` caches the T(x) part (ctx.teacher_logits) only
    TEACHER_CACHE_AUTO = False
    HPARAMS = {
        **pgd_hparams(
            eps=(8 / 255, "IAD IAD-I.py config_train 'epsilon': 8/255"),
            step_size=(2 / 255, "IAD IAD-I.py config_train 'step_size': 2/255"),
            steps=(10, "IAD IAD-I.py config_train 'num_steps': 10"),
        ),
        "tau": HParam(1.0, "distillation temperature of the teacher term (IAD IAD-I.py --temp 1.0)"),
        "alpha": HParam(1.0, "weight of the KL terms; 1-alpha weighs CE(S(x), y) (IAD IAD-I.py --alpha 1.0)"),
        "beta": HParam(
            0.1, "exponent of the teacher's reliability A_i = softmax(T(x'))[i, y_i]^beta (IAD IAD-I.py --beta 0.1)"
        ),
        "begin": HParam(
            60,
            "first epoch (from 0) of the IAD loss; before it the ARD-style warm-up (IAD "
            "IAD-I.py --begin 60, `if epoch >= args.begin`)",
        ),
        "table1_form": HParam(
            False,
            "True: the paper's Table 1 form, the teacher term weighted by A_i too; "
            "False (default): the official IAD-I.py loss, teacher term unweighted",
        ),
        "lr_bug": HParam(
            False,
            "True reproduces IAD-I.py's adjust_learning_rate bug, inherited from ARD "
            "(the decay at epoch 150 never happens; the lr stays 0.01); False (default) "
            "applies both decays",
        ),
    }
    SCHEDULE = dataclasses.replace(  # ARD's numbers
        ARD.SCHEDULE,
        source="IAD IAD-I.py: --lr 0.1, --lr_schedule 100 150 (epochs from 0), --lr_factor 0.1, "
        "--epochs 200, SGD momentum 0.9, weight_decay 2e-4, batch 128",
    )

    def validate(self) -> None:
        super().validate()
        self.beta = check_range(self.name, "beta", self.beta, 0.0)
        self.begin = check_count(self.name, "begin", self.begin)
        self.table1_form = check_flag(self.name, "table1_form", self.table1_form)

    def introspecting(self, epoch: int) -> bool:
        """Whether epoch `epoch` (from 0) uses the IAD loss rather than the warm-up."""
        return epoch >= self.begin

    def reliability(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        """A_i = softmax(T(x'))[i, y_i]^beta, the teacher (eval mode, no_grad) on the adversarial batch."""
        if ctx.teacher is None:
            raise ValueError("IAD needs ctx.teacher (the teacher on x') from epoch `begin` on")
        with model_mode(ctx.teacher, "eval"), torch.no_grad():
            p = F.softmax(upcast(ctx.teacher(x_adv)), dim=1)
        return p.gather(1, ctx.y.unsqueeze(1)).squeeze(1).pow(self.beta)

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        t_logits = teacher_logits(ctx)
        batch = ctx.x.shape[0]
        logits_adv = ctx.student(x_adv)
        logits_nat = ctx.student(ctx.x)
        kl_teacher = self._distill(logits_adv, t_logits, "none")  # tau^2 * KL(T^tau(x) || S^tau(x')) per i
        loss_nat = F.cross_entropy(upcast(logits_nat), ctx.y)
        stats = dict(
            acc_nat=accuracy(logits_nat, ctx.y), acc_adv=accuracy(logits_adv, ctx.y), loss_nat=loss_nat.detach()
        )
        if self.introspecting(ctx.epoch):
            a = self.reliability(ctx, x_adv)
            if self.table1_form:
                kl_teacher = a * kl_teacher
            kl_self = ops.softmax_kl(logits_adv, logits_nat, reduction="none")  # KL(S(x) || S(x'))
            loss_kl = kl_teacher.sum() / batch
            loss_self = ((1.0 - a) * kl_self).sum() / batch
            loss = self.alpha * (loss_kl + loss_self) + (1.0 - self.alpha) * loss_nat
            stats.update(loss_self=loss_self.detach(), reliability=a.mean())
        else:
            loss_kl = kl_teacher.sum() / batch
            loss = self.alpha * loss_kl + (1.0 - self.alpha) * loss_nat
        stats.update(loss=loss.detach(), loss_kl=loss_kl.detach())
        ctx.stats.update(stats)
        return loss
