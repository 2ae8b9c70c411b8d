"""One training epoch and the held-out evaluation. Nothing here writes files or touches global state.

Per batch, ``step.train_step`` (shared with the benchmarks), in the official codes' order: T(x) once with the
teacher in eval mode (distillation methods only; under ``inference_mode``, where the official codes use
no_grad: same numbers, less bookkeeping), ``student.train()``, ``loss = method.loss(ctx)`` (the method runs
its own attack inside, in whatever mode its official code uses), ``opt.zero_grad(set_to_none=True)``,
``loss.backward()``, ``opt.step()``. The lr scheduler steps once per epoch, in the caller.

Under torchrun (``dist`` active) ``student`` is the DDP wrapper and each rank trains on its own shard (same
number of steps on every rank: the loader pads its shards); the epoch's statistics are averaged over the
ranks (one all-reduce per epoch) so every rank reports, and rank 0 logs, the whole epoch. The evaluation
splits the held images into one contiguous slice per rank and sums the correct counts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from rslad_fast.attacks.eval_attacks import PGD
from rslad_fast.attacks.pgd import model_mode
from rslad_fast.models.loading import non_finite_names

from .step import train_step


class Diverged(RuntimeError):
    """The training loss, a weight or a buffer became NaN or infinite."""


def first_non_finite(module: torch.nn.Module):
    """The name of the first parameter or buffer holding a NaN or inf, else None (one device sync)."""
    bad = non_finite_names(module.state_dict())
    return bad[0] if bad else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochState:
    """What :func:`train_one_epoch` trains with: the runner's objects (``build.Parts``), the loader and the
    run's precision, memory format, process group and teacher cache.

    ``student`` may be the DDP wrapper. ``amp_dtype`` (None: fp32, or torch.bfloat16) autocasts the
    student's and the teacher's passes; ``channels_last`` puts each batch in channels_last memory format
    (the models are converted by the builder). ``dist`` (an active ``engine.dist.Dist``): the returned means
    are over every rank's batches and ``images_per_s`` counts every rank's images. ``teacher_cache`` (an
    ``engine.teacher_cache.TeacherCache``; the loader then yields view ids): T(x) from it, and the epoch's
    ``teacher_cache_hit_rate`` and ``teacher_forwards_saved`` over every rank."""

    student: torch.nn.Module
    method: object
    loader: object
    optimizer: torch.optim.Optimizer
    teacher: Optional[torch.nn.Module] = None
    generator: Optional[torch.Generator] = None
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    dist: object = None
    teacher_cache: object = None
    fold: object = None  # build.Parts.fold: the student's folded copy for its eval-mode attack


def train_one_epoch(state: EpochState, epoch: int, *, bar=None, on_batch=None) -> dict:
    """Train ``state.student`` for one epoch (``epoch`` counts from 0); return the epoch's means and timings.

    ``bar`` (a tqdm bar or None) is advanced once per batch; its postfix shows the running loss and img/s,
    refreshed every few batches so that reading the loss (a device sync) stays rare.

    ``on_batch`` (a callable or None) is called after each batch with the number of batches done (the
    runner's time estimate, ``estimate.FirstBatches``).
    """
    student, method, loader, optimizer = state.student, state.method, state.loader, state.optimizer
    teacher, generator, amp_dtype, dist = state.teacher, state.generator, state.amp_dtype, state.dist
    channels_last, teacher_cache = state.channels_last, state.teacher_cache
    device = next(student.parameters()).device
    loader.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    # Batches before the first non-finite loss, counted on the device (no host sync per batch): a sum that
    # took one inf or NaN stays non-finite, so counting the batches after which it is finite finds it.
    n_finite = torch.zeros((), device=device, dtype=torch.int64)
    stat_sums: dict = {}
    n_batches = n_images = 0
    cache_start = teacher_cache.stats() if teacher_cache is not None else None
    _sync(device)
    t0 = time.perf_counter()
    for x, y, *views in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, ctx = train_step(
            student,
            method,
            optimizer,
            x,
            y,
            teacher=teacher,
            epoch=epoch,
            generator=generator,
            amp_dtype=amp_dtype,
            cache=teacher_cache,
            views=views[0] if views else None,
            fold=state.fold,
        )
        loss_sum += loss.double()
        n_finite += torch.isfinite(loss_sum)
        for key, value in ctx.stats.items():
            if key == "loss":  # the same number as train_loss
                continue
            v = value.detach().double() if torch.is_tensor(value) else float(value)
            stat_sums[key] = stat_sums.get(key, 0.0) + v
        n_batches += 1
        n_images += x.shape[0]
        if on_batch is not None:
            on_batch(n_batches)
        if bar is not None:
            bar.update(1)
            if n_batches % 10 == 1 or n_batches == len(loader):
                elapsed = time.perf_counter() - t0
                bar.set_postfix(
                    loss=f"{float(loss_sum) / n_batches:.4f}",
                    img_s=f"{n_images / max(elapsed, 1e-9):.0f}",
                    refresh=False,
                )
    # One float64 vector of this rank's sums (loss, each statistic, batches, images); under torchrun summed
    # over the ranks in one all-reduce: each rank has as many batches, so the means are the rank means' mean.
    keys = list(stat_sums)  # the same method on every rank: the same keys in the same order
    parts = [loss_sum.reshape(1)] + [
        torch.as_tensor(stat_sums[k], dtype=torch.float64, device=device).reshape(1) for k in keys
    ]
    hits, lookups = (
        (0, 0) if cache_start is None else (now - then for now, then in zip(teacher_cache.stats(), cache_start))
    )
    # always there, zeros uncached: the all-reduced vector has one shape on every rank
    parts.append(torch.tensor([hits, lookups], dtype=torch.float64, device=device))
    parts.append(torch.tensor([n_batches, n_images], dtype=torch.float64, device=device))
    sums = torch.cat(parts)
    if dist is not None and dist.active:
        sums = dist.all_reduce_sum_(sums)
    total = sums.tolist()  # syncs the device
    dt = time.perf_counter() - t0
    batches, images = total[-2], total[-1]
    out = {"train_loss": total[0] / max(batches, 1)}
    for i, key in enumerate(keys):
        out[f"train_{key}"] = total[1 + i] / batches
    if not math.isfinite(out["train_loss"]):  # every rank sees the summed loss: all of them stop here
        first = min(dist.all_gather_object(int(n_finite))) if dist is not None and dist.active else int(n_finite)
        raise Diverged(
            f"training diverged in epoch {epoch + 1}: the loss of batch {first + 1}/{n_batches} is not finite"
        )
    if cache_start is not None:
        hits, lookups = total[-4], total[-3]
        out.update(teacher_cache_hit_rate=hits / max(lookups, 1), teacher_forwards_saved=int(hits))
    out.update(epoch_time_s=dt, images_per_s=images / max(dt, 1e-9), batches=n_batches)
    return out


def evaluate(
    model,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    attack: dict,
    batch_size: int,
    generator: torch.Generator | None = None,
    dist=None,
) -> dict:
    """Clean and PGD accuracy (fractions) of ``model`` on a fixed set, the model in eval mode.

    ``images_uint8`` [N, 3, H, W] uint8 and ``labels`` live on the model's device. ``attack``: eps, alpha,
    steps, start (``train.EVAL_ATTACK``, as config.json records it) of the evaluation attack
    ``attacks.PGD`` (cross-entropy), its random start drawn from ``generator`` so evaluation never consumes
    the training RNG streams. The model's train/eval modes are restored afterwards.

    ``dist`` (an active ``engine.dist.Dist``; ``model`` the plain module, never the DDP wrapper, whose
    forward would expect a backward): this rank evaluates its contiguous slice of the set, with its own
    ``generator``, and the correct counts are summed over the ranks, so every image counts exactly once and
    every rank returns the same figures.
    """
    pgd_attack = PGD(**attack)
    n_total = len(images_uint8)
    if dist is not None and dist.active:
        lo, hi = dist.shard(n_total)
        images_uint8, labels = images_uint8[lo:hi], labels[lo:hi]
    device = images_uint8.device
    correct_clean = torch.zeros((), dtype=torch.long, device=device)
    correct_adv = torch.zeros((), dtype=torch.long, device=device)
    _sync(device)
    t0 = time.perf_counter()
    with model_mode(model, "eval"):
        for i in range(0, len(images_uint8), batch_size):
            x = images_uint8[i : i + batch_size].float().div_(255.0)
            y = labels[i : i + batch_size]
            with torch.no_grad():
                correct_clean += (model(x).argmax(1) == y).sum()
            x_adv = pgd_attack(model, x, y, generator=generator)
            with torch.no_grad():
                correct_adv += (model(x_adv).argmax(1) == y).sum()
    if dist is not None and dist.active:
        counts = dist.all_reduce_sum_(torch.stack([correct_clean, correct_adv]))
        correct_clean, correct_adv = counts[0], counts[1]
    _sync(device)
    n = max(n_total, 1)
    return {
        "clean_acc": int(correct_clean) / n,
        "pgd20_acc": int(correct_adv) / n,
        "eval_n": n_total,
        "eval_time_s": time.perf_counter() - t0,
    }
