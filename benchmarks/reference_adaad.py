"""The baseline for AdaAD's step: one training step written the usual eager way, as the official code runs it
(boyellow/AdaAD, `AT_helper.py` `adaad_inner_loss` lines 8-48 and the AdaAD branch of `main.py`'s `train`,
lines 326-353). It exists only to be measured against (benchmarks/test_headline_bench.py's AdaAD rows).

- fp32, contiguous tensors, no fused op;
- the attack: the student and the teacher in eval mode, x + 0.001*N(0,1), 10 steps of
  `torch.autograd.grad` of sum(KLDivLoss(reduction='none')(log_softmax(S(x')), softmax(T(x')))), the
  teacher's logits not detached (the gradient runs back through both models), sign step, min/max
  projection, clamp to [0, 1], and a last clamp;
- the loss: the student in train mode on x then x', the teacher in eval mode under no_grad on x and x',
  alpha * KL(T(x')||S(x')) + (1 - alpha) * KL(T(x)||S(x)) with `nn.KLDivLoss()` (CIFAR-10's mean over
  the B*C elements), alpha = 1.0 (main.py:41);
- SGD lr 0.1, momentum 0.9, weight decay 5e-4 (main.py:61-64, 246-248).
The batch comes from reference_rslad's DataLoader (torchvision's crop and flip, as main.py's trainloader).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def adaad_inner_loss(student, teacher, x_natural, step_size=2 / 255, epsilon=8 / 255, steps=10):
    """The official attack (AT_helper.py:8-48 with its defaults, BN_eval and random_init on)."""
    kl = nn.KLDivLoss(reduction="none")
    student.eval()
    teacher.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, device=x_natural.device)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = torch.sum(kl(F.log_softmax(student(x_adv), dim=1), F.softmax(teacher(x_adv), dim=1)))
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    student.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def train_step(student, teacher, optimizer, x, alpha=1.0):
    """One official AdaAD step on CIFAR-10 (main.py:326-353, then loss.backward(), optimizer.step())."""
    x_adv = adaad_inner_loss(student, teacher, x)
    student.train()
    optimizer.zero_grad()
    nat_logits = student(x)
    adv_logits = student(x_adv)
    with torch.no_grad():
        teacher.eval()
        t_nat = teacher(x)
        t_adv = teacher(x_adv)
    loss_adv = nn.KLDivLoss()(F.log_softmax(adv_logits, dim=1), F.softmax(t_adv.detach(), dim=1))
    loss_nat = nn.KLDivLoss()(F.log_softmax(nat_logits, dim=1), F.softmax(t_nat.detach(), dim=1))
    loss = alpha * loss_adv + (1 - alpha) * loss_nat
    loss.backward()
    optimizer.step()
    return loss.detach()


def sgd(student):
    """The official optimizer: SGD, lr 0.1, momentum 0.9, weight decay 5e-4 (main.py:61-64, 246-248)."""
    return torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
