"""Test-only checks of a crop/flip augmentation: a matcher that recovers the crop/flip drawn for each image,
and a chi-square test of the drawn offsets against the uniform distribution."""

import torch
import torch.nn.functional as F

from rslad_fast.data import CropFlipParams, apply_crop_flip

CHI2_DF8_P001 = 26.12  # chi-square critical value, 8 degrees of freedom, p = 0.001


def chi2_uniform(values: torch.Tensor, k: int) -> float:
    counts = torch.bincount(values, minlength=k).double()
    expected = values.numel() / k
    return float(((counts - expected) ** 2 / expected).sum())


def infer_crop_flip_params(outputs: torch.Tensor, sources: torch.Tensor, padding: int = 4) -> CropFlipParams:
    """Recover each output's (top, left, flip) by matching it against the windows of its padded source.

    ``outputs`` and ``sources`` are uint8 [B, C, H, W] (pair i = augmented image i and its original).
    Used to check that another pipeline (DALI) draws the same crop/flip distribution as ours; images
    must be distinctive (random noise is ideal). Every (top, left, flip) candidate is first screened on a
    few interior probe pixels (which come from the source whatever the offset), then the winner is
    verified on the whole image; images without an exact match get -1 / False.
    """
    b, c, h, w = sources.shape
    dev = sources.device
    k = 2 * padding + 1
    grid = torch.arange(k, device=dev)
    top = grid.repeat_interleave(k).repeat(2)  # all 2*k*k candidates
    left = grid.repeat(k).repeat(2)
    flip = torch.arange(2, device=dev).repeat_interleave(k * k).bool()
    pi = torch.linspace(padding, h - 1 - padding, 4, device=dev).long().repeat_interleave(4)  # 16 probes
    pj = torch.linspace(padding, w - 1 - padding, 4, device=dev).long().repeat(4)
    padded = F.pad(sources, (padding,) * 4)
    rows = top[:, None] + pi  # [m, P] in padded coordinates
    cols = left[:, None] + torch.where(flip[:, None], (w - 1) - pj, pj)
    cand = padded[:, :, rows, cols]  # [B, C, m, P]
    probe = outputs[:, :, pi, pj][:, :, None, :]  # [B, C, 1, P]
    hit = (cand == probe).all(-1).all(1)  # [B, m]
    j = hit.float().argmax(1)
    params = CropFlipParams(top[j], left[j], flip[j], padding)
    ok = hit.any(1) & (apply_crop_flip(sources, params) == outputs).flatten(1).all(1)
    neg = torch.full_like(j, -1)
    return CropFlipParams(torch.where(ok, top[j], neg), torch.where(ok, left[j], neg), flip[j] & ok, padding)
