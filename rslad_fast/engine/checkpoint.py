"""Training checkpoints: atomic writes, everything needed to resume bit for bit, loadable with weights_only.

A checkpoint (``last.pt``, ``best.pt``) is one dict::

    {'format': 1,
     'model': student state_dict,          'optimizer': SGD state_dict,   'scheduler': MultiStepLR state_dict,
     'epoch': completed epochs (1-based count; resume trains epoch index `epoch` next),
     'best_acc': best held-out PGD-20 accuracy so far (fraction, -1.0 before any evaluation),
     'rng': {'torch', 'cuda', 'numpy', 'python', 'train_generator', 'loader', 'world_size', 'train_generators'},
     'config': the run's resolved config (plain JSON types),
     'method': the method's own training state, {} for all but a method with a ``state_dict`` (MTARD's
               adaptive weights), restored into it by ``--resume``}

Everything in it is a tensor, a number, a string, None or a list/tuple/dict/Counter of those, so
``torch.load(path, weights_only=True)`` reads it (numpy's RNG state is stored as tensors for that reason).

Under torchrun only rank 0 writes; the model is the plain module (no DDP ``module.`` prefix), and
``rng['train_generators']`` holds every rank's attack generator (``train_generator`` is rank 0's), with the
``world_size`` that trained. Resuming at the same world size restores each rank's own stream (bitwise as an
uninterrupted run, on the CPU); at another world size the model, optimizer, scheduler and epoch continue
exactly, and the per-rank streams are re-derived (see ``runner.run``): a correct continuation, not bitwise
any uninterrupted run, since the shards, the per-rank batches and the gradient averaging differ.

Atomic: written through ``rslad_fast.atomic`` (temporary file, fsync, ``os.replace``), so a run killed at any
moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import math
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

# WriteError and atomic_write_bytes are re-exported: they lived here first, and the engine, train and reproduce
# still import them from this module
from rslad_fast.atomic import WriteError, atomic_write, atomic_write_bytes  # noqa: F401
from rslad_fast.errors import UserError
from rslad_fast.models.loading import non_finite_names

FORMAT = 1


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ---- RNG states ------------------------------------------------------------------------------------------


def rng_state(
    train_generator: torch.Generator | None,
    *,
    loader_seed: int,
    next_epoch: int,
    train_generators: list | None = None,
    world_size: int = 1,
) -> dict:
    """Every random stream the training loop touches, as weights_only-loadable values.

    The loader's shuffle and augmentation are pure functions of ``(seed, epoch, rank)`` (see
    ``data.loaders``), so nothing of it needs restoring; its seed and next epoch are a record for the reader.
    ``train_generators``: every rank's generator state (default: ``[train_generator]``'s).
    """
    if train_generators is None:
        train_generators = [] if train_generator is None else [train_generator.get_state()]
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all())
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "train_generator": None if train_generator is None else train_generator.get_state(),
        "loader": {"seed": int(loader_seed), "next_epoch": int(next_epoch)},
        "world_size": int(world_size),
        "train_generators": list(train_generators),
    }


def saved_world_size(state: dict) -> int:
    """The world size that wrote ``state`` (checkpoints from before multi-process training: 1)."""
    world = state.get("world_size", 1)
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1):
        raise ValueError(f"world_size {world!r} is not a process count")
    return world


def set_rng_state(state: dict, train_generator: torch.Generator | None, *, rank: int = 0) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches).

    ``train_generator`` gets rank ``rank``'s saved state when there is one (else rank 0's); the caller
    re-seeds it when the world size changed."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if train_generator is not None:
        per_rank = state.get("train_generators") or []
        if rank < len(per_rank):
            train_generator.set_state(per_rank[rank])
        elif state.get("train_generator") is not None:
            train_generator.set_state(state["train_generator"])


# ---- save / load -----------------------------------------------------------------------------------------


def save_checkpoint(
    path,
    *,
    model,
    optimizer,
    scheduler,
    epoch: int,
    best_acc: float,
    config: dict,
    train_generator: torch.Generator | None,
    loader_seed: int,
    train_generators: list | None = None,
    world_size: int = 1,
    method=None,
) -> None:
    atomic_save(
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": int(epoch),
            "best_acc": float(best_acc),
            "rng": rng_state(
                train_generator,
                loader_seed=loader_seed,
                next_epoch=epoch,
                train_generators=train_generators,
                world_size=world_size,
            ),
            "config": config,
            "method": method.state_dict() if hasattr(method, "state_dict") else {},
        },
        path,
    )


def load_checkpoint(path) -> dict:
    """Read one of our training checkpoints with ``weights_only=True``; UserError when unusable."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as e:
        refused = re.search(
            r"Unsupported (global: GLOBAL \S+|class \S+|operand \S+)|allowlisted|unrecognized "
            r"function",
            str(e),
        )
        if refused is None:
            raise UserError(
                f"checkpoint {path}: not a readable training checkpoint (corrupt or truncated: "
                f"{type(e).__name__}); delete it to restart that run from scratch"
            ) from None
        raise UserError(
            f"checkpoint {path}: holds objects a safe load refuses (torch.load with weights_only="
            f"True: {refused.group(0).replace('GLOBAL ', '')}); this engine writes tensors and plain "
            f"values only, so the file was not written by it or was altered; not loaded"
        ) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        OSError,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
    ) as e:
        raise UserError(
            f"checkpoint {path}: not a readable training checkpoint (corrupt or truncated: "
            f"{type(e).__name__}); delete it to restart that run from scratch"
        ) from None
    needed = ("format", "model", "optimizer", "scheduler", "epoch", "best_acc", "rng", "config")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise UserError(
            f"checkpoint {path}: not a training checkpoint of this engine (expected keys {', '.join(needed)})"
        )
    if ckpt["format"] != FORMAT:
        raise UserError(f"checkpoint {path}: format {ckpt['format']!r}, this engine reads format {FORMAT}")
    return ckpt


_MALFORMED = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def restore(
    ckpt: dict,
    *,
    model,
    optimizer,
    scheduler,
    train_generator: torch.Generator | None,
    rank: int = 0,
    path="checkpoint",
    epochs: int | None = None,
    method=None,
) -> None:
    """Put model, optimizer, scheduler and all RNG streams back to the state saved in ``ckpt``.

    A checkpoint with the right keys and the wrong content (shapes of another model, NaN weights, an epoch
    that is no count of completed epochs, optimizer or schedule state that does not fit, a missing or short
    RNG state) is one UserError naming what is wrong; the caller then runs nothing. ``epochs``: the run's
    length, the largest valid ``epoch``."""

    def bad(what):
        return UserError(
            f"checkpoint {path}: {what}; not a checkpoint of this run (delete it to restart the run from scratch)"
        )

    epoch, best_acc = ckpt["epoch"], ckpt["best_acc"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch <= (epochs or epoch)):
        raise bad(f"epoch {epoch!r} is not a count of completed epochs (an integer in [0, {epochs}])")
    if not (
        isinstance(best_acc, (int, float)) and not isinstance(best_acc, bool) and (best_acc == -1 or 0 <= best_acc <= 1)
    ):
        raise bad(f"best_acc {best_acc!r} is not an accuracy (a fraction, or -1 before any evaluation)")

    saved, expected = ckpt["model"], model.state_dict()
    if not isinstance(saved, dict) or not all(torch.is_tensor(v) for v in saved.values()):
        raise bad("its model is not a state dict of tensors")
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise bad(
            f"its model does not fit the run's student (missing {', '.join(missing[:3]) or 'nothing'}; "
            f"unexpected {', '.join(unexpected[:3]) or 'nothing'})"
        )
    for key, want in expected.items():
        if saved[key].shape != want.shape:
            raise bad(
                f"its model does not fit the run's student: {key} has shape {list(saved[key].shape)}, "
                f"the model's is {list(want.shape)}"
            )
    nonfinite = non_finite_names(saved)
    if nonfinite:
        raise bad(f"its weights hold NaN or inf ({nonfinite[0]})")

    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except _MALFORMED as e:
        raise bad(f"its optimizer state does not fit the model ({_why(e)})") from None
    for group in optimizer.param_groups:
        if not all(
            isinstance(group.get(k), (int, float)) and not isinstance(group.get(k), bool) and math.isfinite(group[k])
            for k in ("lr", "momentum", "weight_decay")
        ):
            raise bad("its optimizer state holds a non-numeric or non-finite lr, momentum or weight decay")
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and (not torch.is_tensor(buf) or buf.shape != p.shape):
                raise bad("its optimizer state does not fit the model (a momentum buffer of another shape)")

    fixed = {k: getattr(scheduler, k) for k in ("milestones", "gamma", "base_lrs")}
    try:
        scheduler.load_state_dict(ckpt["scheduler"])
    except _MALFORMED as e:
        raise bad(f"its lr schedule state is malformed ({_why(e)})") from None
    if {k: getattr(scheduler, k, None) for k in fixed} != fixed or scheduler.last_epoch != epoch:
        raise bad(
            f"its lr schedule (milestones, gamma, lr, last epoch {getattr(scheduler, 'last_epoch', None)!r}) "
            f"does not match its epoch {epoch} and config.json"
        )

    try:
        saved_world_size(ckpt["rng"])
        set_rng_state(ckpt["rng"], train_generator, rank=rank)
    except _MALFORMED as e:
        raise bad(f"its RNG state is missing or malformed ({_why(e)})") from None
    if hasattr(method, "load_state_dict"):  # the method's own state (MTARD's adaptive weights)
        try:
            method.load_state_dict(ckpt["method"])
        except _MALFORMED as e:
            raise bad(f"its {type(method).__name__} state is missing or malformed ({_why(e)})") from None
    model.load_state_dict(saved, strict=True)  # last: every check above passed
