"""The three artifact formats of ``python -m rslad_fast.export``: how each is written from an eval-mode model and
how it is loaded back for the verification (``verify.py``), which runs the loaded artifact, never the module it
was made from.

- ``onnx``: ``torch.onnx.export(..., dynamo=True)`` (torch.export underneath, onnxscript translates), one
  self-contained ``.onnx`` file (``external_data=False``), run back by ONNX Runtime's CPU provider.
- ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save``, loaded by ``torch.jit.load``.
- ``exported``: ``torch.export.export`` + ``torch.export.save`` (``.pt2``), loaded by ``torch.export.load``.

Every artifact takes float32 images in [0, 1], NCHW, input ``images``, and returns the logits. The batch
dimension is dynamic (``batch=None``: one symbolic dimension, any size from 1) or fixed (``batch=N``: every
format accepts exactly N images; a traced TorchScript graph of these convolutional models would take any
batch, so with a fixed one the saved module is a scripted guard around the traced graph that refuses another
size with an error (torch.jit.Error) naming both).

onnx, onnxscript and onnxruntime are the ``export`` extra (setup.py); they are imported only when an onnx
artifact is made, and their absence is one error line.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from rslad_fast.errors import UserError

INPUT, OUTPUT = "images", "logits"  # the artifact's input and output names (onnx; metadata for all)
MAX_BATCH = 1 << 16  # the dynamic batch dimension's upper bound (torch.export needs one to be finite-checked)


def _need(module: str):
    """Import one of the ``export`` extra's packages, or say how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(
            f"--format onnx needs the package {module!r}: pip install -e '.[export]' (onnx, onnxscript, "
            f"onnxruntime; scripts/setup.sh installs them)"
        ) from None


@contextlib.contextmanager
def _quiet():
    """The exporters' progress prints and torch.jit's deprecation warnings stay off our output; an error
    still raises."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        yield


def _batch_dim(batch: Optional[int]):
    return None if batch is not None else {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def _example(batch: Optional[int]) -> torch.Tensor:
    # a dynamic batch is traced at 2 (torch.export specializes sizes 0 and 1)
    return torch.rand(batch or 2, 3, 32, 32)


# ---- writing ------------------------------------------------------------------------------------------------


def _save_onnx(model: nn.Module, path, batch: Optional[int]) -> dict:
    onnx, _, ort = _need("onnx"), _need("onnxscript"), _need("onnxruntime")

    with _quiet():
        torch.onnx.export(
            model,
            (_example(batch),),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=_batch_dim(batch),
            dynamo=True,
            external_data=False,  # one file; every model here is far below protobuf's 2 GB
        )
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


class _FixedBatch(nn.Module):
    """A traced graph that takes exactly ``batch`` images (scripted: the check is in the saved module)."""

    def __init__(self, traced: torch.jit.ScriptModule, batch: int):
        super().__init__()
        self.model = traced
        self.batch = batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.size(0) != self.batch:
            raise RuntimeError(
                "this model was exported for a fixed batch of "
                + str(self.batch)
                + " images, got "
                + str(images.size(0))
            )
        return self.model(images)


def _save_torchscript(model: nn.Module, path, batch: Optional[int]) -> dict:
    with _quiet():
        module = torch.jit.trace(model, _example(batch))
        if batch is not None:
            module = torch.jit.script(_FixedBatch(module, batch))
        torch.jit.save(module, str(path))
    return {"method": "torch.jit.trace" + (" in a scripted fixed-batch guard" if batch is not None else "")}


def _save_exported(model: nn.Module, path, batch: Optional[int]) -> dict:
    with _quiet():
        program = torch.export.export(model, (_example(batch),), dynamic_shapes=_batch_dim(batch))
        torch.export.save(program, str(path))
    return {"method": "torch.export.export"}


# ---- loading back -------------------------------------------------------------------------------------------


def _load_onnx(path) -> Callable[[torch.Tensor], torch.Tensor]:
    ort = _need("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.detach().cpu().float().numpy())})[0]
        return torch.from_numpy(out)

    return run


def _load_torchscript(path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _quiet():
            return module(x.detach().cpu().float())

    return run


def _load_exported(path) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.detach().cpu().float())

    return run


@dataclass(frozen=True)
class Format:
    name: str  # --format
    filename: str  # the artifact's name in the output folder
    runtime: str  # what the verification loads it with
    save: Callable[[nn.Module, object, Optional[int]], dict]  # (model, path, batch) -> facts for the metadata
    load: Callable[[object], Callable[[torch.Tensor], torch.Tensor]]  # path -> images -> logits


FORMATS = {
    f.name: f
    for f in (
        Format("onnx", "model.onnx", "onnxruntime InferenceSession (CPUExecutionProvider)", _save_onnx, _load_onnx),
        Format("torchscript", "model.torchscript.pt", "torch.jit.load", _save_torchscript, _load_torchscript),
        Format("exported", "model.pt2", "torch.export.load(...).module()", _save_exported, _load_exported),
    )
}
NAMES = tuple(FORMATS)


def parse_formats(text: str) -> list:
    """``onnx,exported`` -> ["onnx", "exported"] (in FORMATS' order, duplicates dropped; ``all``: every one)."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if names == ["all"]:
        return list(NAMES)
    if not names:
        raise UserError(f"--format: no format given; choose from {', '.join(NAMES)} (or all)")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserError(f"--format: unknown format(s) {', '.join(map(repr, unknown))}; choose from {', '.join(NAMES)}")
    return [n for n in NAMES if n in names]


class InputNormalization(nn.Module):
    """``model((x - mean) / std)``: the data set normalization a model expects, put inside the graph so that the
    artifact takes [0, 1] images. The students here (as RSLAD's) take [0, 1] images as they are, so for them
    :func:`in_graph` adds nothing; this module is for a model that expects normalized input (and is how a test
    breaks an export on purpose)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def in_graph(model: nn.Module, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> nn.Module:
    """``model`` with the normalization (mean, std) it expects on [0, 1] images in front; the identity (0, 1)
    adds no op."""
    if tuple(mean) == (0.0, 0.0, 0.0) and tuple(std) == (1.0, 1.0, 1.0):
        return model
    return InputNormalization(model, mean, std).eval()


__all__ = ["FORMATS", "Format", "INPUT", "InputNormalization", "NAMES", "OUTPUT", "in_graph", "parse_formats"]
