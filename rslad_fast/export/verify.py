"""The verification that is part of every export: the artifact, loaded back by its own runtime, must give the
PyTorch model's predictions on N test images and on the PGD-20 adversarial examples made against the PyTorch
model, within a stated logit tolerance. A mismatch raises :class:`VerificationError` (the export then writes
nothing); the figures of a passing check go into metadata.json and the printout.

The rule, per image set (clean, PGD-20):

- the largest |logit difference| between the artifact and the PyTorch model must be <= ``atol``;
- every prediction must agree, except on a near-tie: where the PyTorch model's top two logits are within
  ``2 * atol``, logits that agree within ``atol`` may still rank the two the other way, so such an image is
  counted and reported (``ties``) but is not an error. A flip on any other image is an error even if the
  logits were within tolerance (it cannot be, so it would mean a broken comparison).

The reference is the engine's model: the checkpoint in an unfolded eval-mode PyTorch module in float32 on the
CPU (the artifact runs on the CPU too); the adversarial examples are made against that model (on ``device``)
and the reference logits on them are taken on the CPU.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from rslad_fast.attacks.pgd import model_mode

CHUNK = 100  # images per call of the artifact when its batch is dynamic (memory only)


class VerificationError(Exception):
    """The exported artifact does not compute what the PyTorch model computes (one line: what, how far)."""


@torch.no_grad()
def reference_logits(model: nn.Module, images: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The PyTorch model's float32 logits on the CPU, ``images`` float in [0, 1]."""
    with model_mode(model, "eval"):
        return torch.cat([model(images[i : i + chunk].float()) for i in range(0, len(images), chunk)]).float()


def artifact_logits(run: Callable, images: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
    """The artifact's logits in chunks of its batch: a fixed batch gets its last chunk padded with zero images
    (their outputs dropped); a dynamic one gets chunks of :data:`CHUNK` and the remainder."""
    size = batch or CHUNK
    out = []
    for i in range(0, len(images), size):
        x = images[i : i + size].float()
        k = len(x)
        if batch is not None and k < batch:
            x = torch.cat([x, x.new_zeros((batch - k, *x.shape[1:]))])
        out.append(torch.as_tensor(run(x)).float()[:k])
    return torch.cat(out)


def compare(reference: torch.Tensor, got: torch.Tensor, atol: float) -> dict:
    """The figures of one image set (see the module doc for the rule); ``ok`` False on a mismatch."""
    if tuple(got.shape) != tuple(reference.shape):
        return {
            "n": len(reference),
            "ok": False,
            "why": f"output shape {tuple(got.shape)}, expected {tuple(reference.shape)}",
        }
    diff = (got - reference).abs()
    finite = bool(torch.isfinite(got).all())
    max_diff = float(diff.max()) if finite else math.inf
    pred_ref, pred_got = reference.argmax(1), got.argmax(1)
    top2 = reference.topk(2, dim=1).values if reference.shape[1] > 1 else None
    margin = (top2[:, 0] - top2[:, 1]) if top2 is not None else torch.full((len(reference),), math.inf)
    flipped = pred_ref != pred_got
    ties = int((flipped & (margin <= 2 * atol)).sum())
    hard = int((flipped & (margin > 2 * atol)).sum())
    out = {
        "n": len(reference),
        "agree": int((~flipped).sum()),
        "ties": ties,
        "max_abs_logit_diff": max_diff,
        "ok": finite and max_diff <= atol and hard == 0,
    }
    if not out["ok"]:
        parts = []
        if not finite:
            parts.append("non-finite logits")
        elif max_diff > atol:
            parts.append(f"max |logit diff| {max_diff:.3g} > tolerance {atol:g}")
        if hard:
            parts.append(f"{hard} of {len(reference)} predictions differ")
        out["why"] = ", ".join(parts)
    return out


def adversarial(
    model: nn.Module, attack, images: torch.Tensor, labels: torch.Tensor, *, device, seed: int, chunk: int = CHUNK
) -> torch.Tensor:
    """``attack``'s examples against ``model`` (moved to ``device``; the caller keeps the CPU original), one
    generator seeded with ``seed`` drawn in image order; returned on the CPU."""
    model = model.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(images), chunk):
        x, y = images[i : i + chunk].to(device).float(), labels[i : i + chunk].to(device)
        out.append(attack(model, x, y, generator=generator).detach().cpu())
    return torch.cat(out)


def check(name: str, figures: dict) -> None:
    """Raise :class:`VerificationError` for the first image set of ``figures`` (set -> compare's dict) that
    failed."""
    for what, f in figures.items():
        if not f["ok"]:
            raise VerificationError(f"verification failed: {name} on {f['n']} {what} images: {f['why']}")


def line(name: str, figures: dict) -> str:
    """One printed line of a passing check."""
    parts = []
    for what, f in figures.items():
        ties = f", {f['ties']} near-tie(s)" if f["ties"] else ""
        parts.append(f"{what} {f['agree']}/{f['n']} agree, max |logit diff| {f['max_abs_logit_diff']:.2e}{ties}")
    return f"{name:<12} " + "; ".join(parts)


__all__ = [
    "CHUNK",
    "VerificationError",
    "adversarial",
    "artifact_logits",
    "check",
    "compare",
    "line",
    "reference_logits",
]
