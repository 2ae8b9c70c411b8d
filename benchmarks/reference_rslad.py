"""The baseline: an RSLAD training epoch written the usual eager way, as in the official code
(zibojia/RSLAD, rslad_train.py / rslad_loss.py). It exists only to be measured against.

- fp32, contiguous tensors, no CUDA graph, no fused op;
- PGD as the official `rslad_inner_loss`: `torch.autograd.grad` of the input (no parameter gradients);
  `train_step(..., attack="backward")` takes the gradient with `loss.backward()` instead, as ARD's and
  IAD's PGD and most user loops do (parameter gradients computed, then thrown away by `zero_grad()`);
- the loss as `nn.KLDivLoss` of log_softmax and softmax, the step as sign / min / max / clamp;
- a torch DataLoader over PIL images with torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip and
  ToTensor, as the official code's CIFAR10 dataset does.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image


class CIFARImages(torch.utils.data.Dataset):
    """uint8 [N, 3, 32, 32] images served as PIL images through torchvision transforms."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor):
        self.images = images_uint8.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as PIL wants
        self.labels = labels.numpy()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def make_dataloader(images_uint8, labels, batch_size=128, num_workers=2, seed=0):
    return torch.utils.data.DataLoader(
        CIFARImages(images_uint8, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def rslad_inner_loss(
    model, teacher_logits, x_natural, step_size=2 / 255, epsilon=8 / 255, perturb_steps=10, input_grad_only=True
):
    """The official attack: the input gradient by torch.autograd.grad, as the official RSLAD code takes it,
    or (input_grad_only=False) by backward(), parameter gradients computed too."""
    criterion_kl = nn.KLDivLoss(reduction="none")
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, device=x_natural.device)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        loss_kl = torch.sum(criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1)))
        if input_grad_only:
            (grad,) = torch.autograd.grad(loss_kl, [x_adv])
        else:
            loss_kl.backward()
            grad = x_adv.grad
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()


def train_step(student, teacher, optimizer, x, attack="autograd.grad"):
    """One official RSLAD step: T(x) under no_grad, x' by PGD-10, 5/6 KL(S(x')) + 1/6 KL(S(x)) (mean).
    attack: "autograd.grad" (the official code) or "backward" (the ARD/TRADES-style loop)."""
    if attack not in ("autograd.grad", "backward"):
        raise ValueError(f"attack must be 'autograd.grad' or 'backward', got {attack!r}")
    student.train()
    with torch.no_grad():
        teacher_logits = teacher(x)
    x_adv = rslad_inner_loss(student, teacher_logits, x, input_grad_only=attack == "autograd.grad")
    optimizer.zero_grad()
    adv_logits = student(x_adv)
    nat_logits = student(x)
    kl = nn.KLDivLoss(reduction="none")
    target = F.softmax(teacher_logits.detach(), dim=1)
    loss = 5 / 6 * torch.mean(kl(F.log_softmax(adv_logits, dim=1), target)) + 1 / 6 * torch.mean(
        kl(F.log_softmax(nat_logits, dim=1), target)
    )
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(student, teacher, optimizer, loader, device, max_batches=None):
    """Returns the number of images trained on."""
    n = 0
    for i, (x, _) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(device, non_blocking=True)
        train_step(student, teacher, optimizer, x)
        n += x.shape[0]
    return n


def sgd(student):
    """The official optimizer: SGD, lr 0.1, momentum 0.9, weight decay 2e-4."""
    return torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def random_cifar(n, seed=0):
    """Stand-in CIFAR-sized uint8 data for timing (the pixels do not change the cost)."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, size=n)).long()
    return images, labels
