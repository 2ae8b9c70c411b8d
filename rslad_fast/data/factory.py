"""Loaders by name, :func:`make_loader`: ``"torch"`` (:class:`~.loaders.TensorLoader`) or ``"dali"``
(:class:`~.dali.DaliLoader`).

Its own module because the DALI loader builds on ``loaders`` (the same order and shards): the base module
never imports its DALI variant. NVIDIA DALI itself stays optional: ``dali.py`` imports ``nvidia.dali`` only
when a pipeline is built, and a ``"dali"`` request without it is one UserError.
"""

from __future__ import annotations

import torch

from rslad_fast.errors import UserError

from .dali import DaliLoader
from .loaders import TensorLoader

KINDS = ("torch", "dali")


def make_loader(
    kind: str,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    train: bool,
    device: torch.device | str = "cpu",
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    augment: bool = True,
    with_views: bool = False,
):
    """Build a loader by name: ``"torch"`` (:class:`TensorLoader`, any device) or ``"dali"`` (NVIDIA DALI).

    ``"dali"`` trains on CUDA devices only (on CPU the torch loader is the faster choice and the one we
    test for training); a DALI eval loader may run on CPU. Bad names or missing DALI raise UserError.
    ``with_views``: batches are ``(x, y, views)`` (see :class:`TensorLoader`), for the teacher-logit cache.
    """
    kw = dict(
        train=train,
        device=device,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        augment=augment,
        with_views=with_views,
    )
    if kind == "torch":
        return TensorLoader(images_uint8, labels, batch_size, **kw)
    if kind != "dali":
        raise UserError(f"unknown loader {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:
        raise UserError(
            f"the 'dali' loader needs NVIDIA DALI, which is not importable ({type(e).__name__}: {e}); "
            f"install it with `pip install nvidia-dali-cuda130`, or use the 'torch' loader"
        ) from None
    if train and torch.device(device).type != "cuda":
        raise UserError(
            f"the 'dali' loader trains on a CUDA device only (got device {device!s}); use the 'torch' loader on CPU"
        )
    return DaliLoader(images_uint8, labels, batch_size, **kw)
