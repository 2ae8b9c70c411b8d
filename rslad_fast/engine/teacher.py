"""The teacher of the distillation methods: loaded from a user's checkpoint, or trained by the run itself.

- ``--teacher PATH``: :func:`load_teacher` builds ``--teacher-arch`` (default wrn34-10, the RSLAD teacher)
  and loads the file with ``models.loading.load_checkpoint_into`` (weights_only, strict: a missing, corrupt
  or mismatching file, or one with NaN/inf weights or buffers, is a one-line UserError before the run
  directory exists).
- no ``--teacher``: the run trains its own teacher with TRADES first, in ``RUN_DIR/teacher/`` (a complete
  run directory of its own: config.json, metrics.jsonl, last.pt, best.pt, curves.png), resumed like any
  run, and then distills from its final weights (``teacher/last.pt``: the official codes use the last
  checkpoint, not a test-set-selected one). See ``runner.run``.

Either way the teacher is frozen: eval mode (BatchNorm uses its running statistics, as the official codes'
``teacher.eval()``) and ``requires_grad=False`` on every parameter.
"""

from __future__ import annotations

import torch

from rslad_fast.models import build
from rslad_fast.models.loading import load_checkpoint_into


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(path, arch: str, device="cpu") -> torch.nn.Module:
    """Build ``arch``, load ``path`` into it strictly and safely, freeze it, move it to ``device``."""
    model = build(arch)
    load_checkpoint_into(model, path, arch)
    return freeze(model).to(device)
