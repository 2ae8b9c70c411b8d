"""PeerAiD (Jung et al., CVPR 2024, "PeerAiD: Improving Adversarial Distillation from a Specialized Peer
Tutor"): a peer model trained alongside the student on the student's adversarial examples; no pretrained
teacher.

Official code: jaewonalive/PeerAiD (read at commit cd12e92), `main.py` (arguments lines 24-71, the config
read at 80-116, eps and step 131-134, models 158-170, the attack 186, optimizers 219-220, `train_kd` lines
315-432, `adjust_learning_rate` 840-852, the epoch loop 889-905), `attack_function.py` (`LinfPeerAttack`,
lines 59-84), `configs/PeerAiD_resnet18_cifar10.json` / `_cifar100.json` and `training_scripts/*.sh`
(README.md's commands for the paper's Table 1).
- The peer P: the student's architecture (`--p_type` = `--s_type` in every official script: resnet18 /
  resnet18, wideresnet34x10 / wideresnet34x10), randomly initialised (main.py:160-164). Here it is built by
  the engine beside the student (`bind_peer`, engine/build.py), initialised right after it from the run's
  seed, and trained by this method with its own SGD: lr `peer_lr` 0.1 (config `lr_peer`), momentum 0.9,
  weight decay the run's (main.py:219-220 give both optimizers the one `args.weight_decay`, config
  `weight_decay` 2e-4): `peer_weight_decay` follows --weight-decay when that is given and is the official
  2e-4 otherwise (`FOLLOWS_RUN_WEIGHT_DECAY`, resolved by engine/resolution.py); --peer-weight-decay, a flag
  the official code does not have, sets the peer's alone. Its lr is divided by 10 at the
  run's milestones (config `lr_decay_epochs_peer` = `lr_decay_epochs_student` = [214, 259, 284] in every
  CIFAR config; `adjust_learning_rate`, main.py:840-852, 893). Its weights and momentum are in every
  checkpoint (`state_dict`), so --resume continues it bitwise.
- Per batch (main.py:340-404): P(x) in eval mode under no_grad (346-350); the attack (`LinfPeerAttack` on the
  student, 186, 352; attack_function.py:65-84): the student in eval mode, x + 0.001*N(0,1), 10 sign steps
  of 2/255 (`--k_train` 10, main.py:29; alpha 2/255, main.py:134) maximizing sum KL(P(x) || S(x')), each
  followed by the projection onto the 8/255 ball (main.py:131) and a clamp to [0, 1]. Then in train mode
  P(x') (359), S(x') (361, the peer's target), S(x') again (376) and S(x) (387): BatchNorm sees x' twice;
      loss_peer = gamma1 * CE(P(x'), y) + gamma2 * tau^2 * KLDivLoss()(log_softmax(P(x')/tau),
                  softmax(S(x')/tau))                                               (363)
      loss_student = lamb1 * CE(S(x'), y) + lamb2 * T^2 * KLDivLoss()(log_softmax(S(x')/T),
                  softmax(P(x')/T) detached) + lamb3 * T^2 * KLDivLoss()(log_softmax(S(x')/T),
                  softmax(S(x)/T))                                                  (393-397)
  KLDivLoss() is the mean over the B*C elements; S(x') in loss_peer and S(x) in loss_student are NOT
  detached: loss_peer's KL term backpropagates into the student. One backward of loss_peer + loss_student,
  then both optimizers step (400-404). Here the peer's part of that backward (the gradient of loss_peer in
  P's parameters, S(x') a constant there) is taken inside `loss_at` and the peer steps there; the loss
  returned to the engine carries the rest, loss_student plus loss_peer's KL with P(x') a constant, and
  loss_peer's CE as a constant: its value is the official loss_total and its gradient in the student's
  parameters the official one (the test checks both models after a step against main.py's).
- Defaults (training_scripts/resnet18_cifar10.sh): --temperature 5 (T), --gamma1 1, --gamma2 0.1 (1 on
  CIFAR-100, resnet18_cifar100.sh), --re_kd_temperature 1 (tau), --lamb1 0, --lamb2 1, --lamb3 1; the
  schedule from configs/PeerAiD_resnet18_cifar10.json: 300 epochs, batch 128, lr 0.1, weight decay 2e-4,
  lr /10 at epochs 214, 259, 284 (epochs from 0: `epoch >= i` divides), momentum 0.9 (main.py:220).

- The SWA student (`--swa_s` in every official command, README.md; on by default here, `--no-swa` turns it
  off): from the first lr decay epoch (main.py:110-111 `args.swa_s_start = args.lr_decay_epochs_student[0]`;
  `--swa-start` here, -1 meaning that milestone), after each epoch's training the official code averages the
  student's parameters into a second copy (`moving_average` with 1/(n+1), then `bn_update`: the BatchNorm
  statistics recomputed over one pass of the training loader, main.py:427-432; rslad_fast/models/averaging.py)
  and evaluates that copy beside the student every epoch (main.py:625-833), keeping its best (by its own
  robust accuracy) and its last weights. It does not change how the student or the peer train. Here the
  engine calls `after_epoch` at the same point, evaluates the copy on the same held-out images as the student
  (`swa_clean_acc`, `swa_pgd20_acc` in metrics.jsonl) and writes `swa_best.pt` and `swa_last.pt` beside
  `best.pt` and `last.pt`; `evaluate --run` reports all four and `export --ckpt swa_best` exports it. The
  copy starts as the student's weights (the official one is a fresh model whose parameters the first average,
  alpha = 1, overwrites: the same), and its state (weights, n, best accuracy) is in every checkpoint, so
  --resume continues it bitwise.
  The BatchNorm pass draws its own shuffle and crops/flips (the run's seed, the epoch and a salt of its own:
  the training batches' random streams stay untouched) and, under torchrun, runs over the whole training set
  on every process, so the copy is the single-process one on every rank (its statistics are then broadcast
  from rank 0, as the student's are, so that every rank evaluates the model rank 0 saves). A run whose epochs
  end before the first average keeps no copy and writes no swa_ file.

What could not be followed to the letter, and why:
- Under torchrun the peer is no DDP module of its own: its gradients are averaged over the processes by an
  all-reduce before its step and its BatchNorm buffers broadcast from rank 0 before each batch, as DDP does
  for the student; `--sync-bn` converts the student only.
- steps=0: the official attack fails (`x` unbound, attack_function.py:71-73); the engine returns x itself.
- The quick preset's `per_image_loss_lr` (lr x f, weight decay / f, f = `per_image_factor` = C: the exact SGD
  step of the per-image form of a loss averaged over the B*C logits, at the official lr and weight decay) is
  applied to the student alone: on CIFAR-100 its lr is 0.1 x 100 and its weight decay 2e-4 / 100, while the
  peer keeps `peer_lr` 0.1 and the official 2e-4. That is the faithful reading: the factor turns a per-logit
  mean into a per-image one, and the student's loss is such a mean (lamb1 = 0: two KLDivLoss() terms, and
  loss_peer's KL in the student), but the peer's is not: its main term, gamma1 * CE(P(x'), y), is already
  per image (CrossEntropyLoss's mean over the B images), so lr x C would take C times the official step on
  it (lr 10 on a CE on CIFAR-100). Only the peer's gamma2 * tau^2 KL term is per logit; under that preset it
  pulls the peer towards the student 1/C as hard as a per-image KL would, as at the official values in every
  preset (the exact per-image form would rescale gamma2, a loss weight, not the lr). The peer's weight decay
  is therefore the unscaled one: it follows --weight-decay only when that is given (test_peeraid.py
  checks the optimizers under the quick preset on CIFAR-100).
- The teacher-logit cache and a --teacher do not apply: PeerAiD has no pretrained teacher.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from ..attacks.pgd import model_mode, pgd
from ..models.averaging import bn_update, moving_average
from ..models.loading import non_finite_names
from .base import (
    Context,
    HParam,
    Method,
    Schedule,
    accuracy,
    check_attack,
    check_count,
    check_flag,
    check_range,
    pgd_hparams,
    register,
    upcast,
)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@register
class PeerAiD(Method):
    """PeerAiD: the student learns from a peer trained alongside it on the student's adversarial examples."""

    name = "peeraid"
    needs_teacher = False
    LOSS_PER_ELEMENT = True  # the student's terms (lamb1 = 0) are KLDivLoss() means over the B*C elements
    attack_mode = "eval"  # LinfPeerAttack: self.model.eval() (attack_function.py:68)
    attack_start = "normal"  # x + 0.001*N(0,1) (attack_function.py:72)
    HPARAMS = {
        **pgd_hparams(
            eps=(8 / 255, "PeerAiD main.py:131 `epsilon = 8/255`"),
            step_size=(2 / 255, "PeerAiD main.py:134 `alpha = 2/255`"),
            steps=(10, "PeerAiD main.py:29 --k_train 10, training_scripts/*.sh --k_train 10"),
            init_std=(0.001, "PeerAiD attack_function.py:72 `0.001 * torch.randn`"),
        ),
        "temperature": HParam(
            5.0,
            "T of the student's two KL terms, weighted T^2 (PeerAiD training_scripts/resnet18_cifar10.sh "
            "--temperature 5; main.py:31 argparse default 6, main.py:393-397)",
        ),
        "lamb1": HParam(0.0, "weight of the student's CE(S(x'), y) (PeerAiD resnet18_cifar10.sh --lamb1 0)"),
        "lamb2": HParam(1.0, "weight of the student's T^2 KL(P(x')||S(x')) (PeerAiD resnet18_cifar10.sh --lamb2 1)"),
        "lamb3": HParam(1.0, "weight of the student's T^2 KL(S(x)||S(x')) (PeerAiD resnet18_cifar10.sh --lamb3 1)"),
        "gamma1": HParam(
            1.0, "weight of the peer's CE(P(x'), y) (PeerAiD resnet18_cifar10.sh --gamma1 1, main.py:363)"
        ),
        "gamma2": HParam(
            0.1,
            "weight of the peer's tau^2 KL(S(x')||P(x')) (PeerAiD resnet18_cifar10.sh --gamma2 0.1; "
            "resnet18_cifar100.sh --gamma2 1)",
        ),
        "tau": HParam(1.0, "temperature of the peer's KL term (PeerAiD resnet18_cifar10.sh --re_kd_temperature 1)"),
        "peer_lr": HParam(
            0.1,
            "the peer's SGD lr, divided by gamma at the run's milestones (PeerAiD "
            "configs/PeerAiD_resnet18_cifar10.json lr_peer 0.1, lr_decay_epochs_peer = lr_decay_epochs_student; "
            "main.py:219, 893)",
        ),
        "peer_weight_decay": HParam(
            2e-4,
            "the peer's SGD weight decay; by default the run's --weight-decay when given, else 2e-4 (PeerAiD "
            "main.py:219-220: one args.weight_decay for both optimizers; configs/*.json weight_decay 0.0002)",
        ),
        "swa": HParam(
            True,
            "keep the stochastic-weight-averaged student beside the student, evaluated each epoch and saved as "
            "swa_best.pt / swa_last.pt (PeerAiD README.md: every Table 1 command passes --swa_s; main.py:427-432)",
        ),
        "swa_start": HParam(
            -1,
            "the epoch (from 0) from which the SWA student averages; -1: the run's first lr milestone (PeerAiD "
            "main.py:110-111 `args.swa_s_start = args.lr_decay_epochs_student[0]`)",
        ),
    }
    # the hyperparameters that take the run's --weight-decay when it is given and they are not (resolution.py):
    # PeerAiD main.py:219-220 build both SGDs with args.weight_decay
    FOLLOWS_RUN_WEIGHT_DECAY = ("peer_weight_decay",)
    DATASET_DEFAULTS = {"cifar100": {"gamma2": 1.0}}  # training_scripts/resnet18_cifar100.sh --gamma2 1
    SCHEDULE = Schedule(
        epochs=300,
        lr=0.1,
        milestones=(214, 259, 284),
        gamma=0.1,
        momentum=0.9,
        weight_decay=2e-4,
        batch_size=128,
        source="PeerAiD configs/PeerAiD_resnet18_cifar10.json: epochs 300, lr_student 0.1, lr_decay_epochs_student "
        "[214, 259, 284], batch_size 128, weight_decay 0.0002; main.py:220 SGD momentum 0.9; main.py:840-852 lr/10 "
        "for each decay epoch i <= epoch (epochs from 0)",
    )

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.peer: Optional[torch.nn.Module] = None
        self.peer_optimizer: Optional[torch.optim.SGD] = None
        self._milestones, self._gamma = tuple(self.SCHEDULE.milestones), self.SCHEDULE.gamma
        self._pending: Optional[dict] = None  # a checkpoint's peer state, loaded once the peer is bound
        # the SWA student (main.py:167-170, 427-432): bound by the engine when `swa` is on
        self.average: Optional[torch.nn.Module] = None
        self.swa_n = 0  # snapshots averaged so far (main.py `swa_n_student`)
        self.swa_best_acc = -1.0  # its best held-out PGD-20 accuracy so far (main.py `best_student_swa_robust_acc`)

    def validate(self) -> None:
        check_attack(self)
        for key in ("lamb1", "lamb2", "lamb3", "gamma1", "gamma2", "peer_weight_decay"):
            setattr(self, key, check_range(self.name, key, getattr(self, key), 0.0))
        for key in ("temperature", "tau", "peer_lr"):
            setattr(self, key, check_range(self.name, key, getattr(self, key), 0.0, lo_open=True))
        self.swa = check_flag(self.name, "swa", self.swa)
        self.swa_start = check_count(self.name, "swa_start", self.swa_start, minimum=-1)

    # ---- the peer: built by the engine, trained here, checkpointed with the run --------------------------

    def bind_peer(self, peer: torch.nn.Module) -> None:
        """Take the peer (the student's architecture, on the run's device) and make its SGD (main.py:219)."""
        self.peer = peer.train()
        self.peer_optimizer = torch.optim.SGD(
            peer.parameters(), lr=self.peer_lr, momentum=self.SCHEDULE.momentum, weight_decay=self.peer_weight_decay
        )
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def follow_lr_schedule(self, milestones, gamma) -> None:
        """The peer's lr decays at the run's milestones (the official configs: the student's decay epochs)."""
        self._milestones, self._gamma = tuple(milestones), float(gamma)

    def peer_lr_at(self, epoch: int) -> float:
        return self.peer_lr * self._gamma ** sum(1 for m in self._milestones if epoch >= m)

    def bind_average(self, copy: torch.nn.Module) -> None:
        """Take the SWA student's module: a copy of the student (engine/build.py makes it with ``swa`` on)."""
        self.average = copy.eval()
        for p in copy.parameters():
            p.requires_grad_(False)
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def first_average_epoch(self) -> Optional[int]:
        """The epoch (from 0) of the first average: ``swa_start``, or the run's first lr milestone (None: the
        run has none, so nothing is averaged, as the official code, whose start is that milestone, would)."""
        if self.swa_start >= 0:
            return self.swa_start
        return min(self._milestones) if self._milestones else None

    def after_epoch(self, epoch: int, student: torch.nn.Module, batches) -> Optional[torch.nn.Module]:
        """After epoch ``epoch``'s training (main.py:427-432): from the first average epoch on, the student's
        parameters averaged into the SWA student and its BatchNorm statistics recomputed over ``batches()`` (an
        iterable of training images); returns the SWA student to evaluate and save, else None."""
        first = self.first_average_epoch()
        if self.average is None or first is None or epoch < first:
            return None
        moving_average(self.average, student, 1.0 / (self.swa_n + 1))
        self.swa_n += 1
        bn_update(self.average, batches())
        return self.average.eval()

    def state_dict(self) -> dict:
        if self.peer is None:
            return {}
        state = {"peer": self.peer.state_dict(), "optimizer": self.peer_optimizer.state_dict()}
        if self.average is not None:
            state["swa"] = {"model": self.average.state_dict(), "n": self.swa_n, "best_acc": self.swa_best_acc}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state; a part whose module is not bound yet (``--resume`` restores into the
        engine's freshly built method) is applied by ``bind_peer`` / ``bind_average`` when it is."""
        self._pending = state
        if self.peer is not None:
            self.peer.load_state_dict(state["peer"], strict=True)
            self.peer_optimizer.load_state_dict(state["optimizer"])
        if self.average is not None:
            swa = state["swa"]
            n, best = swa["n"], swa["best_acc"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"the SWA count {n!r} is not a count")
            if isinstance(best, bool) or not isinstance(best, (int, float)) or not (best == -1 or 0 <= best <= 1):
                raise ValueError(f"the SWA best accuracy {best!r} is not an accuracy")
            bad = non_finite_names(swa["model"])
            if bad:
                raise ValueError(f"the SWA student's weights hold NaN or inf ({bad[0]})")
            self.average.load_state_dict(swa["model"], strict=True)
            self.swa_n, self.swa_best_acc = n, float(best)
        if self.peer is not None and (self.average is not None or not self.swa):
            self._pending = None

    def _need_peer(self) -> torch.nn.Module:
        if self.peer is None:
            raise ValueError("PeerAiD needs its peer: call bind_peer (engine/build.py does) before training")
        return self.peer

    # ---- attack and loss -------------------------------------------------------------------------------

    def peer_logits(self, ctx: Context) -> torch.Tensor:
        """P(x): the peer in eval mode under no_grad (main.py:346-350), its mode given back."""
        peer = self._need_peer()
        with model_mode(peer, "eval"), torch.no_grad():
            return upcast(peer(ctx.x))

    def objective(self, ctx: Context):
        """sum_i KL(P(x)_i || S(x')_i), LinfPeerAttack's (attack_function.py:76-78)."""
        target = self.peer_logits(ctx)
        return lambda logits: ops.softmax_kl(upcast(logits), target.to(upcast(logits).dtype), reduction="sum")

    def attack(self, ctx: Context) -> torch.Tensor:
        return pgd(ctx.attack_model, ctx.x, self.objective(ctx), **self.pgd_settings(ctx))

    def _step_peer(self, loss_peer: torch.Tensor, epoch: int) -> None:
        """The peer's SGD step on its own loss (main.py:401-403); under torchrun its gradient is averaged over
        the processes first, as DDP averages the student's."""
        peer, opt = self._need_peer(), self.peer_optimizer
        params = [p for p in peer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss_peer, params)
        world = _world()
        for p, g in zip(params, grads):
            if world > 1:
                dist.all_reduce(g)
                g = g / world
            p.grad = g.to(p.dtype)
        for group in opt.param_groups:
            group["lr"] = self.peer_lr_at(epoch)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def loss_at(self, ctx: Context, x_adv: torch.Tensor) -> torch.Tensor:
        peer = self._need_peer()
        if _world() > 1:  # as DDP's broadcast_buffers does for the student: rank 0's BatchNorm statistics
            for b in peer.buffers():
                dist.broadcast(b, 0)
        y, T, tau = ctx.y, self.temperature, self.tau
        p_adv = upcast(peer(x_adv))  # main.py:359, the peer in train mode
        s_target = upcast(ctx.student(x_adv))  # main.py:361
        s_adv = upcast(ctx.student(x_adv))  # main.py:376
        s_nat = upcast(ctx.student(ctx.x))  # main.py:387
        ce_peer = F.cross_entropy(p_adv, y)
        kl_peer_in_peer = ops.softmax_kl(p_adv, s_target.detach(), temperature=tau, reduction="mean")
        kl_peer_in_student = ops.softmax_kl(p_adv.detach(), s_target, temperature=tau, reduction="mean")
        loss_peer = self.gamma1 * ce_peer + self.gamma2 * tau * tau * kl_peer_in_peer
        loss_student = (
            self.lamb1 * F.cross_entropy(s_adv, y)
            + self.lamb2 * T * T * ops.softmax_kl(s_adv, p_adv.detach(), temperature=T, reduction="mean")
            + self.lamb3 * T * T * ops.softmax_kl(s_adv, s_nat, temperature=T, reduction="mean")
        )
        self._step_peer(loss_peer, ctx.epoch)
        # the student's share of loss_peer + loss_student; loss_peer's CE as a constant: the official total
        loss = loss_student + self.gamma2 * tau * tau * kl_peer_in_student + self.gamma1 * ce_peer.detach()
        ctx.stats.update(
            loss=loss.detach(),
            loss_student=loss_student.detach(),
            loss_peer=loss_peer.detach(),
            acc_nat=accuracy(s_nat, y),
            acc_adv=accuracy(s_adv, y),
            peer_acc_adv=accuracy(p_adv, y),
        )
        return loss
