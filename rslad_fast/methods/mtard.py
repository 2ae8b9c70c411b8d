"""MTARD (Zhao et al., ECCV 2022, "Enhanced Accuracy and Robustness via Multi-Teacher Adversarial
Distillation"): an adversarially trained teacher on x', a naturally trained teacher on x, and the per-step
adaptive weights between the two terms.

Official code: zhaoshiji123/MTARD, read at commit 6480a1b, `mtard/mtard_loss.py` (`mtard_inner_loss_ce`, lines
27-58) and `mtard/mtard_resnet18_cifar10.py` (settings lines 15-22, optimizer line 42, the weights lines 44-49,
`kl_loss` lines 51-53, the teachers lines 54-62, the step lines 65-103, the decays lines 135-138);
`mtard/mtard_resnet18_cifar100.py` is the same file line for line but for the data set (lines 5, 33, 36) and
`kl_Loss = 10*torch.mean(kl_Loss)` (lines 79-80).
- Teachers: both in eval mode (`teacher.eval()`, `teacher_nat.eval()`, lines 57, 62), frozen, under no_grad.
  The natural teacher sees the natural batch only, before the attack: T_nat(x) (lines 72-73). Here it is the
  engine's T(x) of the batch (ctx.teacher_logits, under inference_mode; the teacher-logit cache may serve it:
  TEACHER_CACHE_AUTO). The adversarial teacher sees x' only: T_adv(x') (mtard_loss.py:56-57), never x. The
  engine holds them as one module, :class:`TwoTeachers`, whose forward is the natural teacher's (`--teacher`:
  the adversarial one; `--nat-teacher`: the natural one, both loaded with weights_only=True).
- Attack (`mtard_inner_loss_ce`): the student in eval mode (mtard_loss.py:38); start x + 0.001*N(0,1),
  unclamped (line 40); 10 sign steps of 2/255 in the eps = 8/255 ball (the call at cifar10.py:74,
  `epsilon = 8/255.0` line 18), each followed by the projection and the clamp to [0, 1] (lines 42-49);
  objective CE(S(x'), y), the mean over the batch (lines 37, 45), the labels, not a teacher. Here: the shared
  PGD engine (`attacks.pgd.pgd`, start "normal", mode "eval"), eagerly, through the student's BN-folded copy
  (--fold-bn) as every eval-mode attack; the CUDA-graph loop of this project is RSLAD's KL attack only.
- Loss (cifar10.py:75-80, 100): after the attack the student in train mode runs S(x') (mtard_loss.py:51,55)
  and then S(x) (cifar10.py:75-76), in that order (BatchNorm's statistics see x' first);
      kl_Loss1 = mean(kl_loss(log_softmax(S(x')), softmax(T_adv(x')))),
      kl_Loss2 = mean(kl_loss(log_softmax(S(x)),  softmax(T_nat(x)))),
      kl_loss(a, b) = -a*b + log(b + 1e-5)*b,
  each mean over the B*C elements, times 10 on CIFAR-100 (`kl_scale`, DATASET_DEFAULTS); total =
  w_adv * kl_Loss1 + w_nat * kl_Loss2. Here each term is the fused `ops.softmax_kl(..., "mean")` (the
  gradient) plus the teacher-only constant mean(b*(log(b + 1e-5) - log b)), so that the loss VALUES, which
  the weights read, are the official ones (the 1e-5 moves them; RSLAD's module drops it, its loss values
  feed nothing).
- Adaptive weights (cifar10.py:44-49, 82-98), updated every step BEFORE that step's total loss uses them:
  w_nat starts at 1/2; the first step's two loss values are kept as L0_adv, L0_nat; each step
      r_adv = (kl_Loss1 / L0_adv) ** bert,  r_nat = (kl_Loss2 / L0_nat) ** bert,
      w_nat <- w_nat - weight_learn_rate * (w_nat - r_nat / (r_adv + r_nat)),  w_adv = 1 - w_nat,
  bert = 1 (line 20, `weight_beta`), weight_learn_rate = 0.025 (line 19, `weight_lr`), multiplied by 0.1
  together with the lr at the end of epochs 215, 260 and 285 (lines 135-138): here by the run's gamma at
  each of the run's lr milestones (`follow_lr_schedule`, called by the engine's builder), so --milestones
  and the presets move both. The official code reads the values with .item() (Python floats, float64);
  here the state is float64 tensors on the device (no host sync per step), the same arithmetic. The
  state (w_nat, L0, whether L0 is set) is saved in every checkpoint and restored by --resume. Under
  torchrun the two loss values are averaged over the processes before the update (the loss of the global
  batch), so every process holds the same weights; the official code has one process.
- Schedule: SGD lr 0.1, momentum 0.9, weight decay 2e-4 (line 42), batch 128 (line 17), 300 epochs (line
  16), lr x0.1 at the end of 1-based epochs 215, 260, 285 (lines 135-137: 0-based milestones 215, 260, 285).

What could not be followed to the letter, and why:
- The teachers' architectures: the scripts build both as `wideresnet()` (cifar10.py:54, 59) and load the
  empty paths `adv_teacher_path = ''`, `nat_teacher_path = ''` (lines 21-22); the README names the
  adversarial teachers (TRADES' WRN-34-10 on CIFAR-10, WRN-70-16 on CIFAR-100, as RSLAD's: the engine's
  --teacher-arch defaults) and links a clean teacher checkpoint, and the repository's natural-teacher zoo
  `cifar10_nat_teacher_models/resnet.py` loads `cifar10_resnnet56...0_9318.pth` into its CIFAR ResNet-56:
  `--nat-teacher-arch` defaults to resnet56 (NAT_TEACHER_ARCH) on CIFAR-10 only. On CIFAR-100 it has no
  default and must be given (`default_nat_teacher_arch`: one UserError line naming the choices): that zoo is
  CIFAR-10's. mtard_resnet18_cifar100.py builds both teachers as `wideresnet()` (lines 54, 59) from
  `cifar100_models` (line 5), which defines no `wideresnet`; its WideResNets (mtard/cifar100_models/
  wideresnet.py:153-179) are DeepMind-layout with Swish and normalize with CIFAR-10's mean/std though they
  have 100 classes, the natural-teacher-sized one `WideResNet_22_6` (lines 160-165: `mean=CIFAR10_MEAN,
  std=CIFAR10_STD`, constants at lines 8-9). This project's DM WRNs (models/wrn_dm.py `dm_wrn`) normalize with the
  constants RobustBench publishes for their class count's data set, CIFAR-100's at 100 classes, so a
  `dm-wrn22-6` built from them would silently feed that file other inputs than it was trained on; none is
  registered, and a CIFAR-100 resnet56 default would be a CIFAR-10 model's architecture with no source.
- The natural teacher runs in the run's --teacher-dtype, like the adversarial one (the official scripts run
  both in fp32; this engine's CIFAR-100 default is fp16: pass `--teacher-dtype fp32` for theirs).
- `steps=0`: the official code returns clamp(x + 0.001*N(0,1), 0, 1); the engine returns x itself.
"""

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from .. import ops
from ..attacks.pgd import model_mode, pgd
from ..errors import UserError
from ..models import ARCHS
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
    teacher_logits,
    upcast,
)

LOG_EPS = 1e-5  # MTARD mtard_resnet18_cifar10.py:52 `torch.log(b+1e-5)*b`


class TwoTeachers(torch.nn.Module):
    """MTARD's two frozen teachers as the engine's one teacher: ``forward(x)`` is the natural teacher's
    T_nat(x), the only teacher the natural batch goes through (what the engine computes once per batch as
    ctx.teacher_logits and its teacher-logit cache may serve); ``adv`` is the adversarial teacher, which the
    method runs on x' itself."""

    def __init__(self, adv: torch.nn.Module, nat: torch.nn.Module):
        super().__init__()
        self.adv = adv
        self.nat = nat

    def forward(self, x):
        return self.nat(x)


def mtard_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The official `torch.mean(kl_loss(F.log_softmax(S), F.softmax(T)))`, kl_loss(a, b) = -a*b +
    log(b + 1e-5)*b, mean over the B*C elements: the fused softmax_kl's mean KL (differentiable in S) plus the
    teacher-only constant mean(b*(log(b + 1e-5) - log b)). The teacher's logits are a constant target."""
    s = upcast(student_logits)
    t = upcast(teacher_logits).detach()
    if t.dtype != s.dtype:  # e.g. a float64 student with a CastTeacher's float32 logits
        t = t.to(s.dtype)
    with torch.no_grad():
        p = F.softmax(t, dim=1)
        shift = (p * (torch.log(p + LOG_EPS) - F.log_softmax(t, dim=1))).mean()
    return ops.softmax_kl(s, t, reduction="mean") + shift


class AdaptiveWeights:
    """The official per-step weights of the two terms (cifar10.py:44-49, 82-98) as float64 tensors: w_nat
    (w_adv = 1 - w_nat), the first step's loss values L0 = (L0_adv, L0_nat), and whether L0 is set."""

    def __init__(self):
        self.weight_nat = torch.tensor(0.5, dtype=torch.float64)  # cifar10.py:44-47 `1/2.0` each
        self.initial = torch.ones(2, dtype=torch.float64)
        self.started = torch.tensor(False)

    def update(self, loss_adv: torch.Tensor, loss_nat: torch.Tensor, lr: float, beta: float):
        """One official update from this step's two loss values; returns (w_adv, w_nat), float64 0-dim
        tensors on the losses' device. Under torchrun the values are first averaged over the processes."""
        losses = torch.stack([loss_adv.detach(), loss_nat.detach()]).to(torch.float64)
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(losses)
            losses = losses / tdist.get_world_size()
        device = losses.device
        if self.weight_nat.device != device:
            self.weight_nat, self.initial, self.started = (
                t.to(device) for t in (self.weight_nat, self.initial, self.started)
            )
        self.initial.copy_(torch.where(self.started, self.initial, losses))  # cifar10.py:82-85
        self.started.fill_(True)
        rates = (losses / self.initial) ** beta  # cifar10.py:87-92
        target = rates[1] / (rates[0] + rates[1])
        self.weight_nat.copy_(self.weight_nat - lr * (self.weight_nat - target))  # cifar10.py:96
        return 1 - self.weight_nat, self.weight_nat.clone()  # cifar10.py:98

    def state_dict(self) -> dict:
        return {
            "weight_nat": self.weight_nat.detach().cpu().clone(),
            "initial_losses": self.initial.detach().cpu().clone(),
            "started": self.started.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """ValueError (KeyError, TypeError) when ``state`` is not what :meth:`state_dict` writes."""
        w, init, started = state["weight_nat"], state["initial_losses"], state["started"]
        if not all(torch.is_tensor(t) for t in (w, init, started)):
            raise TypeError("MTARD's adaptive weights are not tensors")
        if w.shape != () or init.shape != (2,) or started.shape != () or started.dtype != torch.bool:
            raise ValueError("MTARD's adaptive weights have the wrong shapes")
        if not (torch.isfinite(w) and torch.isfinite(init).all() and 0 <= float(w) <= 1):
            raise ValueError(f"MTARD's weight w_nat {float(w)!r} is not a finite weight in [0, 1]")
        device = self.weight_nat.device
        self.weight_nat = w.to(device, torch.float64).clone()
        self.initial = init.to(device, torch.float64).clone()
        self.started = started.to(device).clone()


@register
class MTARD(Method):
    """MTARD: w_adv * KL(T_adv(x') || S(x')) + w_nat * KL(T_nat(x) || S(x)), x' maximizing CE(S(x'), y),
    the weights adapted every step from the two terms' relative decrease."""

    name = "mtard"
    needs_teacher = True
    needs_nat_teacher = True  # the engine loads --nat-teacher and hands the pair (TwoTeachers) as the teacher
    NAT_TEACHER_ARCH = "resnet56"  # MTARD cifar10_nat_teacher_models/resnet.py: cifar10_resnet56 (see above)
    NAT_TEACHER_ARCHS = {"cifar10": NAT_TEACHER_ARCH}  # CIFAR-100: none, --nat-teacher-arch required (above)
    # the natural teacher sees x only: T_nat(x) is a function of the view; T_adv(x') is never cached
    TEACHER_CACHE_AUTO = True
    LOSS_PER_ELEMENT = True  # each term is a mean over the B*C elements (cifar10.py:79-80), see per_image_factor
    attack_mode = "eval"  # mtard_loss.py:38 model.eval()
    attack_start = "normal"  # mtard_loss.py:40 x + 0.001*randn
    HPARAMS = {
        **pgd_hparams(
            eps=(8 / 255, "MTARD mtard_resnet18_cifar10.py:18 `epsilon = 8/255.0`"),
            step_size=(2 / 255, "MTARD mtard_resnet18_cifar10.py:74 `step_size=2/255.0`"),
            steps=(10, "MTARD mtard_resnet18_cifar10.py:74 `perturb_steps=10`"),
            init_std=(0.001, "MTARD mtard_loss.py:40 `0.001 * torch.randn`"),
        ),
        "weight_lr": HParam(
            0.025,
            "learning rate of MTARD's adaptive weights, x gamma at each lr milestone (MTARD "
            "mtard_resnet18_cifar10.py:19 `weight_learn_rate = 0.025`, lines 135-138 `*= 0.1` with the lr)",
        ),
        "weight_beta": HParam(
            1.0,
            "exponent of MTARD's relative losses (L/L0)**beta in the weight update (MTARD "
            "mtard_resnet18_cifar10.py:20 `bert = 1`, lines 91-92)",
        ),
        "kl_scale": HParam(
            1.0,
            "factor on both KL terms (MTARD mtard_resnet18_cifar10.py:79-80: none; 10 on CIFAR-100, "
            "mtard_resnet18_cifar100.py:79-80 `kl_Loss1 = 10*torch.mean(kl_Loss1)`)",
        ),
    }
    DATASET_DEFAULTS = {"cifar100": {"kl_scale": 10.0}}  # MTARD mtard_resnet18_cifar100.py:79-80
    SCHEDULE = Schedule(
        epochs=300,
        lr=0.1,
        milestones=(215, 260, 285),
        momentum=0.9,
        weight_decay=2e-4,
        batch_size=128,
        source="MTARD mtard_resnet18_cifar10.py:16-17 epochs = 300, batch_size = 128; line 42 SGD(lr=0.1, "
        "momentum=0.9, weight_decay=2e-4); lines 135-137 lr *= 0.1 after 1-based epochs 215, 260, 285",
    )

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.weights = AdaptiveWeights()
        self.lr_milestones, self.lr_gamma = tuple(self.SCHEDULE.milestones), self.SCHEDULE.gamma

    @classmethod
    def default_nat_teacher_arch(cls, dataset: str) -> str:
        """The natural teacher's architecture when --nat-teacher-arch is not given: resnet56 on CIFAR-10 (MTARD's
        cifar10_nat_teacher_models zoo); on CIFAR-100 a UserError (no layout of MTARD's CIFAR-100 models is
        built here: see the module doc)."""
        arch = cls.NAT_TEACHER_ARCHS.get(dataset)
        if arch is None:
            raise UserError(
                f"method 'mtard' on {dataset} needs --nat-teacher-arch, the architecture of your --nat-teacher file "
                f"(MTARD's CIFAR-100 natural teacher, mtard/cifar100_models/wideresnet.py:160-165, is a DeepMind "
                f"WRN-22-6 normalizing with CIFAR-10's mean/std, not built here): one of {', '.join(ARCHS)}"
            )
        return arch

    def validate(self) -> None:
        check_attack(self)
        self.weight_lr = check_range(self.name, "weight_lr", self.weight_lr, 0.0, 1.0)
        self.weight_beta = check_range(self.name, "weight_beta", self.weight_beta, 0.0)
        self.kl_scale = check_range(self.name, "kl_scale", self.kl_scale, 0.0, lo_open=True)

    def per_image_factor(self, num_classes: int) -> float:
        return num_classes / self.kl_scale  # as RSLAD's: a mean over B*C, times kl_scale

    def follow_lr_schedule(self, milestones, gamma: float) -> None:
        """The run's lr decays (0-based epochs, MultiStepLR), which the weights' learning rate follows."""
        self.lr_milestones, self.lr_gamma = tuple(milestones), float(gamma)

    def weight_lr_at(self, epoch: int) -> float:
        """weight_lr x gamma per lr milestone passed before epoch ``epoch`` (from 0), as the lr."""
        return self.weight_lr * self.lr_gamma ** sum(1 for m in self.lr_milestones if epoch >= m)

    def state_dict(self) -> dict:
        """What --resume needs of the method: its adaptive weights (saved in every checkpoint)."""
        return self.weights.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state)

    def objective(self, ctx: Context):
        return cross_entropy_objective(ctx)  # mtard_loss.py:45 CrossEntropyLoss()(model(x_adv), y)

    def attack(self, ctx: Context) -> torch.Tensor:
        return pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))

    def adversarial_teacher(self, ctx: Context) -> torch.nn.Module:
        teacher = ctx.teacher
        if not isinstance(teacher, TwoTeachers):
            raise ValueError("MTARD needs ctx.teacher = TwoTeachers(adversarial, natural): it runs T_adv on x'")
        return teacher.adv

    def teacher_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        """T_adv(x'): the adversarial teacher in eval mode under no_grad (mtard_loss.py:56-57)."""
        adv = self.adversarial_teacher(ctx)
        with model_mode(adv, "eval"), torch.no_grad():
            return upcast(adv(x_adv))

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        t_nat = teacher_logits(ctx)  # T_nat(x): the pair's forward, the engine's (cifar10.py:72-73)
        logits_adv = ctx.student(x_adv)  # mtard_loss.py:55: S(x') first
        t_adv = self.teacher_at(ctx, x_adv)  # mtard_loss.py:57
        logits_nat = ctx.student(ctx.x)  # cifar10.py:76
        loss_adv = self.kl_scale * mtard_kl(logits_adv, t_adv)
        loss_nat = self.kl_scale * mtard_kl(logits_nat, t_nat)
        w_adv, w_nat = self.weights.update(loss_adv, loss_nat, self.weight_lr_at(ctx.epoch), self.weight_beta)
        loss = w_adv.to(loss_adv.dtype) * loss_adv + w_nat.to(loss_nat.dtype) * loss_nat  # cifar10.py:100
        ctx.stats.update(
            loss=loss.detach(),
            loss_adv=loss_adv.detach(),
            loss_nat=loss_nat.detach(),
            weight_adv=w_adv.detach(),
            weight_nat=w_nat.detach(),
            acc_nat=accuracy(logits_nat, ctx.y),
            acc_adv=accuracy(logits_adv, ctx.y),
        )
        return loss
