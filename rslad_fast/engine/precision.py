"""The one TF32 policy of training and evaluation.

TF32 rounds fp32 convolution and matmul inputs to 10 mantissa bits on Ampere and newer GPUs. torch's own
default leaves it on for cuDNN convolutions and off for matmuls, so an "fp32" run would not be fp32, and a
training run's per-epoch PGD-20 (TF32) would not be comparable with `evaluate`'s (strict fp32). Both
entry points therefore set it explicitly, off unless asked (`--allow-tf32`), and record the choice in
config.json / eval.json. The flags are torch-global: they are restored when the block ends.
"""

import contextlib

import torch


def set_tf32(allow: bool) -> tuple:
    """Allow (or forbid) TF32 in cuDNN convolutions and matmuls; returns the previous flags."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    return saved


def restore_tf32(saved: tuple) -> None:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def tf32(allow: bool):
    saved = set_tf32(allow)
    try:
        yield
    finally:
        restore_tf32(saved)
