"""The teacher of the distillation methods: loaded from a user's checkpoint, or trained by the run itself.

- ``--teacher PATH``: :func:`load_teacher` builds ``--teacher-arch`` (default wrn34-10, the RSLAD CIFAR-10
  teacher; wrn70-16 on CIFAR-100) and loads the file with ``models.loading.load_checkpoint_into``
  (weights_only, strict: a missing, corrupt or mismatching file, or one with NaN/inf weights or buffers, is
  a one-line UserError before the run directory exists).
- no ``--teacher``: the run trains its own teacher with TRADES first, in ``RUN_DIR/teacher/`` (a complete
  run directory of its own: config.json, metrics.jsonl, last.pt, best.pt, curves.png), resumed like any
  run, and then distills from its final weights (``teacher/last.pt``: the official codes use the last
  checkpoint, not a test-set-selected one). See ``runner.run``.

- ``--nat-teacher PATH`` (MTARD only, and required there): its naturally trained second teacher, loaded as
  ``--teacher`` is (``--nat-teacher-arch``, default resnet56) in the same dtype; the runner hands the two on
  as one module, ``methods.mtard.TwoTeachers`` (forward: the natural teacher's T(x); ``.adv``: the
  adversarial teacher, which the method runs on x').

Either way the teacher is frozen: eval mode (BatchNorm uses its running statistics, as the official codes'
``teacher.eval()``) and ``requires_grad=False`` on every parameter, built with the data set's class count
(a file with another count is a UserError saying so).

``--teacher-dtype`` (``Config.teacher_dtype``): ``fp32``, or ``fp16`` / ``bf16``, the teacher's weights and
forward in that precision (the official RSLAD CIFAR-100 scripts: ``teacher = teacher.half()``), its logits
handed on in fp32 (:class:`CastTeacher`).
"""

from __future__ import annotations

import torch

from rslad_fast.errors import UserError
from rslad_fast.models import build
from rslad_fast.models.loading import load_checkpoint_into

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CastTeacher(torch.nn.Module):
    """A frozen teacher whose weights, buffers (WRN-70-16's mean/std too) and forward are in ``dtype``: the
    input is cast to it and the logits back to fp32. The forward runs outside autocast, so that ``--amp
    bf16`` does not turn an fp16 teacher into a bf16 one."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.model(x.to(self.dtype)).float()


def cast_teacher(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``model`` in the precision ``dtype`` (DTYPES): unchanged for fp32, else a :class:`CastTeacher`."""
    if dtype not in DTYPES:
        raise UserError(f"--teacher-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return model if dtype == "fp32" else freeze(CastTeacher(model, DTYPES[dtype]))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(
    path,
    arch: str,
    device="cpu",
    *,
    num_classes: int = 10,
    dtype: str = "fp32",
    normalization: str = "cifar10",
    role: str = "teacher",
) -> torch.nn.Module:
    """Build ``arch`` with ``num_classes`` outputs (WRN-70-16: ``normalization``), load ``path`` into it
    strictly and safely (in fp32), freeze it, cast it to ``dtype`` (:func:`cast_teacher`), move it to
    ``device``. ``role`` begins an error's line: "teacher", or "--nat-teacher" (MTARD's natural teacher,
    loaded the same way)."""
    model = build(arch, num_classes, normalization=normalization)
    try:
        load_checkpoint_into(model, path, arch)
    except UserError as e:
        raise UserError(f"{role}: {e}") from None
    return cast_teacher(freeze(model), dtype).to(device)
