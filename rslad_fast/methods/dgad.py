"""DGAD (Park et al., ECCV 2024, "Dynamic Guidance Adversarial Distillation with Enhanced Teacher Knowledge"):
AdaAD's attack, with the teacher's mistakes routed and corrected in the loss.

Official code: kunsaram01/DGAD (read at commit 29a3505, the last commit that touches main.py), `main.py`
(arguments lines 31-87, `lr_decay` lines 120-146, optimizer lines 253-255, the DGAD branch of `train` lines
390-447) and `AT_helper.py` (`adaad_inner_loss`, lines 8-48). Its README.md names no training command.
- Attack: `adaad_inner_loss` (main.py:391-392), line for line AdaAD's (boyellow/AdaAD AT_helper.py:8-48):
  both models in eval mode, x + 0.001*N(0,1), 10 sign steps of sum_i KL(T(x')_i || S(x')_i) through the
  student AND the teacher, each followed by the projection and a clamp to [0, 1]. Here it is AdaAD's
  (`methods/adaad.py`: the PGD engine on the StudentTeacher pair, CUDA-graphed on CUDA inputs under
  `cuda_graph` "auto"), inherited unchanged.
- Loss (main.py:394-447): the student in train mode runs S(x) then S(x') (394-398); the teacher in eval mode
  under no_grad runs T(x) and T(x') (403-406; T(x) is ctx.teacher_logits, the engine's, under inference_mode).
  * lambda_i = 1 where the teacher misclassifies the natural image, argmax T(x)_i != y_i; n = sum lambda
    (408-413).
  * Those rows of T(x) swap two logits: the true class's and the top one's (415-419; the names say "probs",
    the values are logits). Every row of T(x') whose true-class logit is below the best other class's
    (margin < 0) swaps those two (421-427).
  * loss_clean = 1/(n + 1e-10) * sum_i lambda_i KL(T~(x)_i || S(x)_i) (429-431);
    loss_adv = 1/(B - n) * sum_i (1 - lambda_i) KL(T~(x')_i || S(x')_i) (433-434), each KL
    KLDivLoss(reduction='none')(log_softmax(S), softmax(T~)).sum(dim=1): per image.
  * loss_alp = MSELoss()(softmax(S(x')), softmax(S(x))), the mean over the B*C probabilities, both sides with
    their gradient (437; `--alp on`, main.py:43).
  * total, `--alp on`: (n/bs) loss_clean + ((bs-n)/bs) loss_adv + ALP_beta loss_alp (443-445); but for a
    `--model mobilenetV2` student (439-442; main.py:180) 0.5 * ((n/bs) loss_clean + (bs-n)/bs) * loss_adv + ALP_beta
    loss_alp, the parenthesis closing before `* loss_adv`: loss_adv times a weight that holds loss_clean.
    `loss_form` "mobilenetv2" is that line, and `official_setting` gives it to the mnv2 student as main.py
    does; "standard" is lines 443-445. `--alp off`: (n/bs) loss_clean + ((bs-n)/bs) loss_adv for every model
    (446-447).
  The standard total is sum_i [lambda_i KL_nat,i + (1-lambda_i) KL_adv,i] / B + beta*MSE (up to the 1e-10):
  a per-image mean, so under torchrun each process's loss on its share averages, gradient by gradient, to the
  whole batch's. The mobilenetv2 form is a product of two batch means, A = (n/B) loss_clean + (B-n)/B and
  loss_adv, which the processes' own products would not average to: under torchrun the four quantities they
  need (the sums of lambda_i KL_nat,i and of (1-lambda_i) KL_adv,i, n and B) are all-reduced, as MTARD
  all-reduces its loss values, and each process's loss is `mobilenetv2_total`'s: the value the whole
  batch's 0.5 * A * loss_adv, the gradient W * 0.5 * (grad A_mine * loss_adv + A * grad loss_adv_mine) with
  A_mine, loss_adv_mine its own images' shares of the two sums, so that DDP's mean over the W processes is
  the whole batch's gradient (the ALP term, a mean, averages as in the standard form). 2 processes step as
  1 with the combined batch (tests/test_dgad.py, both forms).
- Schedule: SGD (`--optim SGD`, main.py:66, 253-255), lr 0.1 (`--lr_max`, main.py:67), momentum 0.9
  (main.py:69), weight decay 5e-4 (main.py:70), batch 128 (main.py:65), 200 epochs (main.py:64),
  `--lr_schedule piecewise` (main.py:68): at 200 epochs lr_max before epoch 100, /10 before 150, /100 after
  (main.py:120-135, epochs from 0); the warm-up is off (`--warmup_lr` store_true, main.py:73). eps 8/255,
  10 steps of 2/255 (main.py:55-57, /255 at 391-392): here the argparse defaults and the paper's radius agree.

What could not be followed to the letter, and why:
- `bs`: the weights n/bs and (bs-n)/bs use `args.bs`, the configured 128 (main.py:65), while the batch's
  own size is len(inputs); they differ only on the last, partial batch of an epoch (the official trainloader
  keeps it: 50,000 = 390 x 128 + 80), where the official weights do not add up to 1. Here bs is the batch's
  own size, every batch (under torchrun: the process's share), which the method sees; the engine gives a
  method no other batch size.
- n = B (the teacher wrong on every image of a batch): the official `1 / (len(adv_inputs) - num_lambda)`
  raises ZeroDivisionError (a Python float 0.0); here the empty adversarial term is 0.
- steps=0: as AdaAD's (the engine returns x itself).
- The teacher: main.py's CIFAR-10 teacher is `--teacher_model wideresnet34_10` loaded from
  `teacher_models/CIFAR10/wideresnet34_10/robust_teacher.pth` (main.py:37, 206-211), TRADES' layout (its
  networks/wideresnet.py `WideResNet`: `--teacher-arch wrn34-10`), a file the repository neither ships nor
  names a source for (`--teacher_model Chen2021LTD_WRD34_20`, main.py:213-221, is the other
  choice); its CIFAR-100 teacher is Chen2021LTD's WRN-34-10 (main.py:231-237). Both run in fp32 (no `.half()`,
  main.py:226-229, 242-245): on CIFAR-100 pass `--teacher-dtype fp32` for DGAD's own
  setting (this engine's CIFAR-100 default teacher dtype is fp16, engine/config.py DEFAULT_TEACHER_DTYPE).
"""

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from .. import ops
from ..errors import UserError
from .adaad import CUDA_GRAPH, AdaAD, check_cuda_graph
from .base import (
    Context,
    HParam,
    Schedule,
    accuracy,
    check_attack,
    check_flag,
    check_range,
    pgd_hparams,
    register,
    teacher_logits,
    upcast,
)

LOSS_FORMS = ("standard", "mobilenetv2")
MNV2 = "mnv2"  # the student whose official total is main.py:439-442's


def swap_true_and_top(logits: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` in which each row where `rows` is True has its logits at y and at `top` exchanged
    (main.py:415-419, 421-427); other rows unchanged. No host sync (no boolean indexing)."""
    y1, top1 = y.unsqueeze(1), top.unsqueeze(1)
    at_y, at_top = logits.gather(1, y1), logits.gather(1, top1)
    swapped = logits.scatter(1, y1, at_top).scatter(1, top1, at_y)
    return torch.where(rows.unsqueeze(1), swapped, logits)


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def mobilenetv2_total(sum_clean, sum_adv, n, batch, totals=None, world: int = 1) -> torch.Tensor:
    """main.py:439-442 without its ALP term: 0.5 * ((n/B) loss_clean + (B-n)/B) * loss_adv, loss_clean =
    sum_clean / (n + 1e-10), loss_adv = sum_adv / (B - n) (0 when n = B). ``sum_clean`` = sum_i lambda_i KL_nat,i
    and ``sum_adv`` = sum_i (1-lambda_i) KL_adv,i over this process's images, n and B its counts.

    ``totals``: the detached (sum_clean, sum_adv, n, B) summed over the ``world`` processes (None: this batch is
    the whole batch). Then the value is the whole batch's, and the gradient W times the product rule with this
    process's shares of the two sums, the other factor at its whole-batch value: the mean over the processes
    (DDP's) of these gradients is the whole batch's."""
    if totals is None:
        a = (n / batch) * (sum_clean / (n + 1e-10)) + (batch - n) / batch
        return 0.5 * a * (sum_adv / (batch - n).clamp_min(1.0))
    s_clean, s_adv, n_all, b_all = totals.unbind()
    a_all = (n_all / b_all) * (s_clean / (n_all + 1e-10)) + (b_all - n_all) / b_all
    adv_all = s_adv / (b_all - n_all).clamp_min(1.0)
    a_mine = world * (n_all / b_all) * sum_clean / (n_all + 1e-10)  # the part of A that is a sum over images
    adv_mine = world * sum_adv / (b_all - n_all).clamp_min(1.0)
    a = a_mine + (a_all - a_mine).detach()  # value A, gradient W * grad A_mine
    adv = adv_mine + (adv_all - adv_mine).detach()
    return 0.5 * a * adv


def dgad_targets(t_nat: torch.Tensor, t_adv: torch.Tensor, y: torch.Tensor):
    """(lambda, T~(x), T~(x')): lambda_i = 1.0 where argmax T(x)_i != y_i (main.py:408-413); T(x) with the
    true and the top logit swapped on those rows (415-419); T(x') with the true and the best other logit
    swapped where the true one is below it (421-427)."""
    wrong = t_nat.argmax(dim=1) != y
    t_nat_fixed = swap_true_and_top(t_nat, y, wrong, t_nat.max(dim=1).indices)
    others = t_adv.scatter(1, y.unsqueeze(1), -float("inf"))
    best_other, best_other_idx = others.max(dim=1)
    below = t_adv.gather(1, y.unsqueeze(1)).squeeze(1) - best_other < 0
    t_adv_fixed = swap_true_and_top(t_adv, y, below, best_other_idx)
    return wrong.to(t_nat.dtype), t_nat_fixed, t_adv_fixed


@register
class DGAD(AdaAD):
    """DGAD: lambda routes each image to KL(T~(x)||S(x)) (teacher wrong on x) or KL(T~(x')||S(x')), with
    the teacher's wrong logits swapped, plus beta * MSE(softmax(S(x')), softmax(S(x))); AdaAD's attack."""

    name = "dgad"
    LOSS_PER_ELEMENT = False  # per-image KL sums averaged over images; the MSE term is its own mean
    DATASET_DEFAULTS = {}  # main.py's DGAD branch has no data-set-dependent term
    HPARAMS = {
        **pgd_hparams(
            eps=(8 / 255, "DGAD main.py:55 --epsilon 8, /255 at main.py:392"),
            step_size=(2 / 255, "DGAD main.py:57 --step_size 2, /255 at main.py:391"),
            steps=(10, "DGAD main.py:56 --num_steps 10"),
            init_std=(0.001, "DGAD AT_helper.py:27 `0.001 * torch.randn`"),
        ),
        "alp": HParam(
            True,
            "the logit-pairing term beta * MSE(softmax(S(x')), softmax(S(x))) on (DGAD main.py:43 --alp on, "
            "main.py:436-445); off: main.py:446-447",
        ),
        "alp_beta": HParam(1.0, "weight of the logit-pairing term (DGAD main.py:42 --ALP_beta 1.0, main.py:437-445)"),
        "loss_form": HParam(
            "standard",
            "how the terms add up with alp on: 'standard' (n/B) loss_clean + ((B-n)/B) loss_adv + beta*alp "
            "(DGAD main.py:443-445) or 'mobilenetv2' 0.5*((n/B) loss_clean + (B-n)/B) * loss_adv + beta*alp "
            "(main.py:439-442, the official total for a MobileNetV2 student, which gets it by default)",
        ),
        "cuda_graph": CUDA_GRAPH,  # AdaAD's attack's switch
    }
    SCHEDULE = Schedule(
        epochs=200,
        lr=0.1,
        milestones=(100, 150),
        gamma=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=128,
        source="DGAD main.py:64-70 --epochs 200, --bs 128, --optim SGD, --lr_max 0.1, --lr_schedule piecewise, "
        "--momentum 0.9, --weight_decay 5e-4; main.py:120-135 piecewise at 200 epochs: lr_max, /10 from epoch 100, "
        "/100 from epoch 150 (epochs from 0)",
    )

    @classmethod
    def official_setting(cls, student: str, dataset: str = "cifar10"):
        """main.py:439-442: a MobileNetV2 student's total is the mobilenetv2 form."""
        schedule, defaults = super().official_setting(student, dataset)
        return schedule, (dict(defaults, loss_form="mobilenetv2") if student == MNV2 else defaults)

    def validate(self) -> None:
        check_attack(self)
        self.alp = check_flag(self.name, "alp", self.alp)
        self.alp_beta = check_range(self.name, "alp_beta", self.alp_beta, 0.0)
        form = self.loss_form.strip().lower() if isinstance(self.loss_form, str) else self.loss_form
        if form not in LOSS_FORMS:
            raise UserError(f"method 'dgad': loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        self.loss_form = form
        self.cuda_graph = check_cuda_graph(self.name, self.cuda_graph)

    def per_image_factor(self, num_classes: int) -> float:
        return 1.0

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        t_nat = upcast(teacher_logits(ctx))
        t_adv = self.teacher_at(ctx, x_adv)
        logits_nat = upcast(ctx.student(ctx.x))  # main.py:397-398: S(x) first, then S(x')
        logits_adv = upcast(ctx.student(x_adv))
        if t_nat.dtype != logits_nat.dtype:  # e.g. a float64 student with a CastTeacher's float32 logits
            t_nat, t_adv = t_nat.to(logits_nat.dtype), t_adv.to(logits_nat.dtype)
        lam, t_nat_fixed, t_adv_fixed = dgad_targets(t_nat, t_adv, ctx.y)
        batch = float(len(ctx.y))
        n = lam.sum()
        kl_nat = ops.softmax_kl(logits_nat, t_nat_fixed, reduction="none")
        kl_adv = ops.softmax_kl(logits_adv, t_adv_fixed, reduction="none")
        sum_clean, sum_adv = (lam * kl_nat).sum(), ((1.0 - lam) * kl_adv).sum()
        loss_clean = sum_clean / (n + 1e-10)
        loss_adv = sum_adv / (batch - n).clamp_min(1.0)  # n = B: an empty term, 0
        w_clean, w_adv = n / batch, (batch - n) / batch
        stats = dict(loss_clean=loss_clean.detach(), loss_adv=loss_adv.detach(), teacher_wrong=(n / batch).detach())
        if not self.alp:
            loss = w_clean * loss_clean + w_adv * loss_adv
        else:
            loss_alp = F.mse_loss(F.softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1))
            stats["loss_alp"] = loss_alp.detach()
            if self.loss_form == "mobilenetv2":
                totals, world = None, _world()
                if world > 1:  # the whole batch's sums and counts (see mobilenetv2_total)
                    totals = torch.stack([sum_clean.detach(), sum_adv.detach(), n.detach(), n.new_tensor(batch)])
                    tdist.all_reduce(totals)
                loss = mobilenetv2_total(sum_clean, sum_adv, n, batch, totals, world) + self.alp_beta * loss_alp
            else:
                loss = w_clean * loss_clean + w_adv * loss_adv + self.alp_beta * loss_alp
        ctx.stats.update(
            loss=loss.detach(), acc_nat=accuracy(logits_nat, ctx.y), acc_adv=accuracy(logits_adv, ctx.y), **stats
        )
        return loss
