"""The presets and the per-epoch evaluation attack: every value a run takes when neither the command line nor
the method's official code sets it, each documented once, next to it (airbench's style).

Every setting resolves as: the command line, else the preset, else the method's official value (its
HPARAMS and SCHEDULE, cited in rslad_fast/methods/<method>.py); ``resolution.py`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Preset:
    """Settings between the command line and the method's official values (:data:`PRESETS`, where each
    value is explained). None, False and (): the official value, untouched."""

    eval_n: int  # held-out test images (the first ones) evaluated after every epoch
    eval_batch_size: int  # images per evaluation batch (memory only)
    teacher_arch: str  # a self-trained teacher's architecture (no --teacher)
    train_n: Optional[int] = None  # training images, the first ones (None: all 50,000)
    epochs: Optional[int] = None  # the student's epochs
    batch_size: Optional[int] = None  # images per SGD step and process
    attack_steps: Optional[int] = None  # training attack cut to this many PGD steps, the step size scaled
    # so that steps * step_size stays the official
    final_decay: bool = False  # lr milestones [epochs - 1]: one decay, for the last epoch
    scale_epoch_hparams: bool = False  # `epoch_hparams` scaled by epochs / official epochs
    epoch_hparams: Tuple[str, ...] = ()  # method hyperparameters counted in epochs
    channels_last: Optional[bool] = None  # channels_last memory format (None: off)
    per_image_loss_lr: bool = False  # a per-logit-mean loss (Method.LOSS_PER_ELEMENT): lr x f, weight
    # decay / f with f = Method.per_image_factor(C) (C / kl_scale for RSLAD: 10 on CIFAR-10 and, at the
    # official kl_scale 10, on CIFAR-100), i.e. SGD on its per-image form at the official values
    teacher_train_n: Optional[int] = None  # a self-trained teacher's training images (None: train_n)
    teacher_epochs: Optional[int] = None  # a self-trained teacher's epochs (None: its official ones)


# ---- Evaluation after every epoch -------------------------------------------------------------------
# RSLAD's only evaluation (resnet18_rslad_cifar10.py, `attack_pgd` in rslad_loss.py): PGD-20 on CE, the
# model in eval mode, uniform start: the settings of evaluate's pgd20-trades. Run by the same evaluation attack,
# attacks.PGD, on the shared PGD engine; one difference: RSLAD clamps the uniform start to [0, 1] before the
# first gradient, the engine clamps after the first step (the first gradient is taken at most eps outside the
# image box; every later iterate is identical in form).
EVAL_ATTACK = dict(
    eps=8 / 255,  # l_inf radius, inputs in [0, 1]                     (RSLAD: epsilon=8.0/255.0)
    alpha=0.003,  # step size per iteration, same unit                 (RSLAD: step_size=0.003)
    steps=20,  # iterations                                         (RSLAD: attack_iters=20)
    start="uniform",  # x + U(-eps, eps)                                   (RSLAD: uniform_(-epsilon, epsilon))
)

# ---- Presets ----------------------------------------------------------------------------------------
# paper: the chosen method's official settings, untouched (epochs, lr, milestones, momentum, weight decay,
#   batch size: Method.SCHEDULE; attack and loss: Method.HPARAMS). Only the per-epoch evaluation is ours:
#   RSLAD's loop evaluated the whole test set every 20 epochs (every epoch from 215); we evaluate a fixed
#   subset every epoch for the curves. Final numbers come from a separate full evaluation.
# quick: a CPU-sized run that shows the whole pipeline and robust accuracy clearly above the 10% of chance
#   on 2 cores in about 17 minutes (teacher and student): a training subset, few epochs, the
#   training attack cut to `attack_steps` PGD steps (step size scaled so that steps * step_size, the
#   distance the attack can travel, stays the official one: RSLAD 10 x 2/255 -> 1 x 20/255, then projected
#   to the 8/255 ball), the official lr decays collapsed into one x0.1 for the last epoch, IAD's warm-up
#   length scaled by epochs / official epochs, channels_last on, a small ResNet-8 as the self-trained
#   teacher, and for RSLAD the lr x 10 / weight decay / 10 that turns its per-logit mean into a per-image
#   one (see `per_image_loss_lr`). Evaluation stays PGD-20. Everything else (momentum, loss, eps, and the
#   lr and weight decay of every other method) is official.
PRESETS = {
    "paper": Preset(
        train_n=None,  # training images: None = all 50,000
        eval_n=1000,  # held-out test images (the first ones of the test set) evaluated per epoch
        eval_batch_size=500,  # images per evaluation batch (memory only; results do not depend on it)
        teacher_arch="wrn34-10",  # self-trained teacher (no --teacher): TRADES' WRN-34-10, the RSLAD teacher
    ),
    "quick": Preset(
        # Sized on this 2-core CPU (measured 2026-11-25, 2 threads, channels_last, batch 64, nothing else
        # running). A run this short is limited by its number of SGD steps, so the costly pieces are cut or
        # swapped for cheap ones and the steps kept. Per training image: TRADES ResNet-8 ~2.5 ms, RSLAD
        # mnv2 <- ResNet-8 ~26 ms (1-step attack); ~0.14 s per held-out mnv2 image for clean + PGD-20.
        train_n=8000,  # the student's training images: the first 8,000 (16% of CIFAR-10), 125
        # steps an epoch: 41.5% clean / 20.0% PGD-20 from a 25,000-image
        # teacher, where 4,000 gave 36.0% / 15.0% (200 held-out images)
        eval_n=200,  # held-out test images evaluated per epoch (clean + PGD-20)
        eval_batch_size=200,  # images per evaluation batch
        epochs=3,  # the student's epochs
        batch_size=64,  # images per SGD step (official 128): twice the steps for the same
        # compute, which is what a run this short is limited by
        attack_steps=1,  # training attack: PGD steps (official: 10), step size scaled as above
        final_decay=True,  # lr milestones: [epochs - 1], lr x gamma (0.1) for the last epoch only
        scale_epoch_hparams=True,  # `epoch_hparams` scaled by epochs / official epochs
        epoch_hparams=("begin",),  # method hyperparameters counted in epochs (IAD's warm-up length)
        channels_last=True,  # mnv2 on this CPU: 1.75 s vs 2.19 s per forward + input gradient of 128
        # images (resnet18: 2.45 vs 2.31 s, so --no-channels-last for it)
        per_image_loss_lr=True,  # RSLAD averages its KL over the B*C logits, so its gradient is 1/C of a
        # per-image KL's (C = 10; on CIFAR-100 its x10 kl_scale makes the factor C / kl_scale = 10 again:
        # Method.per_image_factor): 300 epochs absorb that, a few hundred steps do not (lr 0.1:
        # 29.5% clean but 0.0% PGD-20 after 4,000 images x 3 epochs; lr 1.0 with
        # weight decay 2e-5: 36.0% / 15.0%). So lr x C and weight decay / C, which
        # is exactly SGD on the per-image KL at lr 0.1, weight decay 2e-4
        # (tests/test_train.py checks the equivalence)
        # The self-trained teacher: He et al.'s CIFAR ResNet-8 (78k parameters) trained with TRADES. It
        # costs ~20x less per TRADES image than mnv2 here (2.5 vs 54 ms), so it sees 10x the images: 20,000 x
        # 4 epochs in ~3.5 minutes. Measured: 10,000 x 4 epochs gave 41.5% clean / 20.0% PGD-20, 25,000 x 4
        # gave 46.5% / 20.0%, widths 32/64/128 (4x the parameters, 2.7x the time) 41.0% / 21.0%, a 2-step
        # attack 39.0% / 21.5%; an mnv2 teacher (4,000 x 3 epochs, ~11 minutes) reached 21.0% / 13.0%.
        teacher_arch="resnet8",
        teacher_train_n=20000,  # the teacher's training images (an explicit --train-n sizes both runs)
        teacher_epochs=4,  # the teacher's epochs (its lr decays for the last one, as above)
    ),
}


# ---- CPU choices per architecture -----------------------------------------------------------------------
# On a CPU, what pays depends on the architecture, so it is chosen per architecture from measurements, not by
# one global switch: the memory format and, where the CPU has native bf16 dot products (avx512_bf16 or AMX,
# engine/hardware.py), bf16 autocast of the student's passes (fp32 master weights) or the teacher's weights.
# A setting given on the command line always wins; an architecture not listed keeps the preset's memory
# format and fp32. CUDA is not measured yet (no GPU has been lent): there the preset's choices stand.
# Measured on this project's AMD EPYC (avx512_bf16, no AMX), torch 2.14.1, eval-mode forward + input gradient
# (an attack step), batch 32, 1 thread, median of 3, 2026-12-07 (another job on the second core):
@dataclass(frozen=True)
class CpuChoice:
    channels_last: Optional[bool] = None  # a trained model's memory format (None: not measured, the preset's)
    train_bf16: bool = False  # with native bf16: autocast of the model's training passes (attack included)
    teacher_bf16: bool = False  # with native bf16: the model as a frozen teacher, in bf16 weights


CPU_CHOICES = {
    # fp32 1.42 s NCHW / 1.54 s channels_last; bf16 0.90 s NCHW / 0.75 s channels_last: 1.9x
    "resnet18": CpuChoice(channels_last=True, train_bf16=True),
    # fp32 1.02 s NCHW / 0.68 s channels_last; bf16 1.04 s / 0.70 s: depthwise convs gain nothing from bf16
    "mnv2": CpuChoice(channels_last=True),
    # the teacher's forward (inference mode), batch 16: fp32 2.65 s, bf16 weights 1.27 s (NCHW): 2.1x
    "wrn34-10": CpuChoice(teacher_bf16=True),
    # the quick preset's self-trained teacher: one whole TRADES step (batch 64, 1-step attack), 2026-12-07,
    # 1 thread, median of 5 alone: fp32 0.203 s / bf16 0.124 s (channels_last), 1.6x; of 8 with four other
    # jobs on the machine: fp32 0.281 s channels_last / 0.351 s NCHW, bf16 0.217 s / 0.284 s
    "resnet8": CpuChoice(channels_last=True, train_bf16=True),
}
