"""Stochastic weight averaging (Izmailov et al., 2018) as PeerAiD's official code does it: the running mean
of the parameters after each epoch, then BatchNorm statistics recomputed over one pass of training batches.

Written from the definitions in jaewonalive/PeerAiD `utils/SWA.py` (`moving_average` lines 25-28,
`bn_update` 61-87), which follow timgaripov/swa:

- ``moving_average(avg, model, alpha)``: every parameter p_avg <- (1 - alpha) p_avg + alpha p_model, with
  alpha = 1 / (n + 1) after n earlier averages (main.py:430): the plain mean of the n + 1 snapshots. Buffers
  are not averaged: the BatchNorm statistics are recomputed instead.
- ``bn_update(model, batches)``: running_mean reset to 0 and running_var to 1, then the model in train mode
  over the batches with each BatchNorm's momentum b / (n + b) (b: this batch's size, n: the images before it),
  so the statistics end as the size-weighted mean of the per-batch mean and unbiased variance; the momenta are
  put back afterwards. ``num_batches_tracked`` keeps counting (the official reset leaves it alone; it only
  matters with momentum=None, which no model here uses).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def moving_average(avg: torch.nn.Module, model: torch.nn.Module, alpha: float) -> None:
    """``avg``'s parameters <- (1 - alpha) * theirs + alpha * ``model``'s (same architecture)."""
    pa, pm = list(avg.parameters()), list(model.parameters())
    if len(pa) != len(pm) or any(a.shape != m.shape for a, m in zip(pa, pm)):
        raise ValueError("moving_average: the two models do not have the same parameters")
    for a, m in zip(pa, pm):
        a.mul_(1.0 - alpha).add_(m.detach().to(a.dtype), alpha=alpha)


@torch.no_grad()
def bn_update(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute ``model``'s BatchNorm statistics over ``batches`` (images, already on the model's device and
    in its memory format) as the official ``bn_update`` does; returns the number of images seen (0 and
    nothing changed for a model without BatchNorm). The model's mode is given back."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    was_training = model.training
    for m in norms:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    model.train()
    seen = 0
    try:
        for x in batches:
            b = x.shape[0]
            for m in norms:
                m.momentum = b / (seen + b)
            model(x)
            seen += b
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return seen
