"""What metadata.json says beside the artifacts: the architecture, the data set and its class names, the input
the artifact takes (range, layout, the normalization it applies), the eval.json row of the exported checkpoint,
the commit, the formats with their verification figures and the tolerance they were held to.

The input: every artifact takes float32 [0, 1] images, NCHW, as the engine feeds its models (uint8 / 255). The
students (resnet18, mnv2, and resnet8 / wrn34-10 / tiny) apply no normalization, as in the official RSLAD
code (zibojia/RSLAD resnet18_rslad_cifar10.py L22-24: ``transform_test = Compose([ToTensor()])``, no
Normalize); WRN-70-16 normalizes inside its forward with its own mean/std (models/wrn_dm.py), which the
artifact therefore contains. ``normalization`` records the effective mean/std and where it happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.nn as nn

from rslad_fast.data import cifar
from rslad_fast.engine.rundir import EVAL_JSON
from rslad_fast.errors import UserError

FORMAT = "rslad_fast.export/1"
# the official CIFAR-10 batches.meta 'label_names', for a data folder without that file (prepared by hand);
# CIFAR-100's 100 names are always read from its 'meta' file, which the reader requires
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}


def class_names(data_root, dataset: str) -> list:
    """The data set's class names, in label order, from its official meta file in ``data_root``."""
    spec = cifar.get(dataset)
    name, key = _META[dataset]
    path = cifar._resolve(data_root, spec) / name
    if not path.is_file():
        if dataset == "cifar10":
            return list(CIFAR10_CLASSES)
        raise UserError(f"{spec.title} file missing: {path} (the class names); {spec.how}")
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in cifar._get(cifar._unpickle(path), key)]
    except Exception as e:
        raise UserError(f"{path}: cannot read the class names ({type(e).__name__}: {e})") from None
    if len(names) != spec.num_classes:
        raise UserError(f"{path}: {len(names)} class names, expected {spec.num_classes}")
    return names


def normalization(model: nn.Module) -> dict:
    """The mean/std the model applies to its [0, 1] input and where: WRN-70-16's buffers, else none."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if mean is not None and std is not None and mean.numel() == 3 and std.numel() == 3:
        return {"mean": mean.flatten().tolist(), "std": std.flatten().tolist(), "where": "inside the model"}
    return {
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "where": "none: the model takes [0, 1] images as they are (RSLAD resnet18_rslad_cifar10.py L22-24, "
        "ToTensor only)",
    }


def eval_row(eval_json: Optional[Path], checkpoint: Path) -> tuple:
    """(the eval.json row of ``checkpoint``, a note): the row whose checkpoint is this file, with the facts that
    give its figures their meaning (n, data set, attacks, seed); (None, why) where there is none."""
    if eval_json is None or not eval_json.is_file():
        where = eval_json if eval_json is not None else EVAL_JSON
        return (
            None,
            f"no {where}: no evaluation recorded (python -m rslad_fast.evaluate --run RUN_DIR, then --eval-json)",
        )
    try:
        report = json.loads(eval_json.read_text())
        rows = report["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--eval-json {eval_json}: not an evaluate report ({type(e).__name__}: {e})") from None
    target = checkpoint.resolve()
    for row in rows:
        path = Path(str(row.get("checkpoint", "")))
        if path.exists() and path.resolve() == target:
            keep = ("n", "dataset", "seed", "columns", "format")
            return {"eval_json": str(eval_json), **{k: report.get(k) for k in keep}, "row": row}, None
    return None, f"{eval_json} holds no row of {checkpoint}"


def build(
    *, arch, dataset, classes, norm, checkpoint, epoch, eval_entry, note, versions, batch, atol, formats, verification
) -> dict:
    return {
        "format": FORMAT,
        "architecture": arch,
        "dataset": dataset,
        "num_classes": len(classes),
        "class_names": classes,
        "input": {
            "name": "images",
            "dtype": "float32",
            "layout": "NCHW",
            "shape": [batch if batch is not None else "batch", 3, 32, 32],
            "range": [0.0, 1.0],
            "normalization": norm,
        },
        "output": {"name": "logits", "shape": [batch if batch is not None else "batch", len(classes)]},
        "batch": batch if batch is not None else "dynamic",
        "checkpoint": str(checkpoint),
        "epoch": epoch,
        "eval": eval_entry,
        "eval_note": note,
        "commit": versions.get("git_commit"),
        "versions": versions,
        "tolerance": {"max_abs_logit_diff": atol, "near_tie_margin": 2 * atol},
        "formats": formats,
        "verification": verification,
    }


__all__ = ["CIFAR10_CLASSES", "FORMAT", "build", "class_names", "eval_row", "normalization"]
