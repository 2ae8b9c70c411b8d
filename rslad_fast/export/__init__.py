"""``python -m rslad_fast.export``: a trained student as a deployable artifact (ONNX, TorchScript, torch.export
``.pt2``), verified as part of the export. :func:`export` is the typed entry point (an :class:`ExportSettings`
in, an :class:`ExportResult` out); ``cli.py`` is the command line around it.

One export, in order (every check that can fail on user input first, before any work):

1. the run directory's config.json (architecture, data set, data folder) and the checkpoint (best.pt or
   last.pt), loaded strictly into the architecture; the test images; the output folder writable;
2. the artifact model: the checkpoint in eval mode, BatchNorm folded into its convolutions (``fold_bn``;
   ``fold_bn=False`` keeps the BatchNorms), the input normalization inside the graph (``metadata.py``);
3. the PGD-20 examples against the PyTorch model (the unfolded eval-mode module the engine evaluates);
4. per format: the artifact written into a temporary folder, loaded back by its runtime and run on the clean
   and the adversarial images (``verify.py``); a mismatch beyond ``atol`` is a :class:`VerificationError`;
5. metadata.json written, and the temporary folder renamed to ``out`` (a previous export there replaced
   whole). A failure at any step leaves ``out`` as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from rslad_fast.attacks.registry import EVAL_ATTACKS
from rslad_fast.data import load_cifar, num_classes
from rslad_fast.data.cifar import NAMES as DATASETS
from rslad_fast.engine.resolution import check_ops_device, resolve_device, versions
from rslad_fast.engine.rundir import CHECKPOINTS, EVAL_JSON, RunDir
from rslad_fast.errors import UserError
from rslad_fast.models import WRN70_NORMS, build, canonical_name, fold_bn
from rslad_fast.models.fold import fold_report
from rslad_fast.models.loading import load_checkpoint_into

from . import formats as fmt
from . import metadata, verify
from .verify import VerificationError

METADATA = "metadata.json"
# the adversarial check's attack: PGD-20 of 0.003 from a uniform start at eps 8/255, RSLAD's own evaluation
# (zibojia/RSLAD resnet18_rslad_cifar10.py L69-71: attack_pgd(attack_iters=20, step_size=0.003,
# epsilon=8/255) on the eval-mode student) = the registry's "pgd20-trades" at its defaults
ATTACK = "pgd20-trades"
# 1e-3 logit units (no official code exports; ours): fp32 re-association (folded BatchNorm, another runtime's
# convolutions) moved the quick-preset student's logits by <= 2e-6 in every format, a wrong input
# normalization by 3.6 and one BatchNorm variance 1% off by 0.022 (README "Export")
ATOL = 1e-3


@dataclass
class ExportSettings:
    run: str  # the run directory
    ckpt: str = "best"  # one of CKPTS
    formats: list = field(default_factory=lambda: list(fmt.NAMES))
    out: Optional[str] = None  # None: RUN/export/CKPT
    batch: Optional[int] = None  # None: a dynamic batch dimension; N: fixed
    n: int = 500  # test images of the verification (the first n of the test split)
    atol: float = ATOL
    fold_bn: bool = True
    eval_json: Optional[str] = None  # None: RUN/eval.json
    data: Optional[str] = None  # None: the run's data folder (config.json)
    device: Optional[str] = "cpu"  # where the PGD-20 examples are made (None: cuda if available)
    seed: int = 0  # the PGD-20 random start

    def replace(self, **changes) -> "ExportSettings":
        return dataclasses.replace(self, **changes)


@dataclass
class ExportResult:
    out: Path
    files: dict  # format -> artifact path
    metadata: dict
    lines: list  # what the verification printed


CKPTS = ("best", "last", "swa_best", "swa_last")  # --ckpt: the run's files of those names (swa_: PeerAiD's SWA student)


def _checkpoint(run: Path, which: str) -> Path:
    if which not in CKPTS:
        raise UserError(f"--ckpt {which!r}: choose one of {', '.join(CKPTS)}")
    if not run.is_dir():
        raise UserError(f"--run {run}: {'not a directory' if run.exists() else 'no such directory'}")
    rd = RunDir(run)
    if not rd.has_config():
        raise UserError(f"--run {run}: no {rd.config.name} there, not a run directory")
    path = rd.path / f"{which}.pt"
    if not path.is_file():
        there = [p.name for p in rd.checkpoints()]
        have = f"it has {', '.join(there)}: pass --ckpt {Path(there[0]).stem}" if there else "it has no checkpoint yet"
        raise UserError(f"--run {run}: no {path.name} ({' or '.join(CHECKPOINTS)}); {have}")
    return path


def _read_config(run: Path) -> dict:
    config = RunDir(run).config_dict()
    student = config.get("student")
    if not isinstance(student, str):
        raise UserError(f"{RunDir(run).config}: no 'student' architecture name in it")
    dataset = config.get("dataset", "cifar10")  # runs before CIFAR-100 existed trained CIFAR-10
    norm = config.get("wrn70_16_norm", "cifar10")
    if dataset not in DATASETS or norm not in WRN70_NORMS:
        raise UserError(f"{RunDir(run).config}: dataset {dataset!r} / wrn70_16_norm {norm!r} not known here")
    return {"arch": canonical_name(student), "dataset": dataset, "norm": norm, "data": config.get("data")}


def _out_dir(s: ExportSettings, run: Path, ckpt: Path) -> Path:
    """The output folder, checked before any work: creatable and writable, not a file, and not a folder of
    something else (a non-empty folder without metadata.json is refused, a previous export is replaced)."""
    out = Path(s.out) if s.out else run / "export" / ckpt.stem
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
        raise UserError(f"--out {out}: not empty and not an export (no {METADATA}); choose another --out")
    p = Path(os.path.abspath(out)).parent
    while not os.path.lexists(p):
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--out {out}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):  # also False on a read-only file system
        raise UserError(f"--out {out}: {p} is not writable")
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an older ``out`` (a previous export, checked by _out_dir) is removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # the previous export back in its place
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _outermost_missing(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (None: it exists)."""
    p, top = Path(os.path.abspath(path)), None
    while not p.exists():
        top, p = p, p.parent
    return top


def _epoch(path: Path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return int(ckpt["epoch"]) if isinstance(ckpt, dict) and "epoch" in ckpt else None
    except Exception:  # the weights loaded already; the epoch is information only
        return None


def export(s: ExportSettings, log=print) -> ExportResult:
    """Export and verify (see the module doc); ``log``: where the verification lines go as they come."""
    run = Path(s.run)
    ckpt = _checkpoint(run, s.ckpt)
    names = fmt.parse_formats(s.formats if isinstance(s.formats, str) else ",".join(s.formats))
    if s.batch is not None and (isinstance(s.batch, bool) or int(s.batch) < 1):
        raise UserError(f"--batch {s.batch}: a positive integer or dynamic")
    if not (s.atol > 0) or int(s.n) < 1:
        raise UserError(f"--atol must be > 0 and --n >= 1 (got {s.atol}, {s.n})")
    cfg = _read_config(run)
    out = _out_dir(s, run, ckpt)
    device = resolve_device(s.device)
    check_ops_device(device)
    classes = num_classes(cfg["dataset"])
    model = load_checkpoint_into(build(cfg["arch"], classes, normalization=cfg["norm"]), ckpt, cfg["arch"]).eval()
    data = s.data or cfg["data"] or "./data"
    try:
        images, labels = load_cifar(data, train=False, dataset=cfg["dataset"], download=False)
    except UserError as e:
        where = f"the data folder {RunDir(run).config} names; pass --data DIR" if not s.data else "--data"
        raise UserError(f"{e} ({where})") from None
    if s.n > len(labels):
        raise UserError(f"--n {s.n} exceeds the {len(labels)} test images in {data}")
    x, y = images[: s.n].float().div(255), labels[: s.n]  # the engine's input: uint8 / 255
    class_names = metadata.class_names(data, cfg["dataset"])
    eval_json = Path(s.eval_json) if s.eval_json else run / EVAL_JSON
    if s.eval_json and not eval_json.is_file():
        raise UserError(f"--eval-json {eval_json}: no such file")
    eval_entry, note = metadata.eval_row(eval_json, ckpt)

    norm = metadata.normalization(model)
    artifact_model = fmt.in_graph(fold_bn(model) if s.fold_bn else copy.deepcopy(model).eval())
    folded = fold_report(model) if s.fold_bn else {"folded": 0, "total": fold_report(model)["total"]}

    attack = EVAL_ATTACKS[ATTACK].make()  # its official defaults, eps 8/255
    attacker = model if device == "cpu" else copy.deepcopy(model)
    x_adv = verify.adversarial(attacker, attack, x, y, device=device, seed=s.seed)
    ref = {"clean": verify.reference_logits(model, x), "PGD-20": verify.reference_logits(model, x_adv)}
    acc = {k: round(100.0 * float((v.argmax(1) == y).float().mean()), 2) for k, v in ref.items()}
    lines = [
        f"PyTorch model ({cfg['arch']}, {cfg['dataset']}, {ckpt.name}) on the first {s.n} test images: "
        f"clean {acc['clean']:.2f}%, PGD-20 {acc['PGD-20']:.2f}% ({attack.name}: eps {attack.eps:.4g}, "
        f"{attack.steps} steps of {attack.alpha:g}); tolerance: max |logit diff| <= {s.atol:g}"
    ]
    log(lines[-1])

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    created = _outermost_missing(out.parent)
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        facts, checks = {}, {}
        for name in names:
            f = fmt.FORMATS[name]
            path = tmp / f.filename
            try:
                facts[name] = {"file": f.filename, "runtime": f.runtime, **f.save(artifact_model, path, s.batch)}
                runner = f.load(path)
            except UserError:
                raise
            except Exception as e:  # an exporter's own failure: one line, which format and why
                raise UserError(
                    f"--format {name}: the export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                ) from None
            figures = {
                what: verify.compare(r, verify.artifact_logits(runner, xs, s.batch), s.atol)
                for (what, r), xs in zip(ref.items(), (x, x_adv))
            }
            if s.batch is None:  # a dynamic batch also runs one image alone
                figures["batch-1"] = verify.compare(
                    ref["clean"][:1], verify.artifact_logits(runner, x[:1], None), s.atol
                )
            verify.check(name, figures)
            checks[name] = figures
            facts[name]["bytes"] = path.stat().st_size
            lines.append(verify.line(name, figures))
            log(lines[-1])
        meta = metadata.build(
            arch=cfg["arch"],
            dataset=cfg["dataset"],
            classes=class_names,
            norm=norm,
            checkpoint=ckpt,
            epoch=_epoch(ckpt),
            eval_entry=eval_entry,
            note=note,
            versions=versions(),
            batch=s.batch,
            atol=s.atol,
            formats=facts,
            verification={
                "n": s.n,
                "images": f"the first {s.n} of the {cfg['dataset']} test split in {data}",
                "attack": {"name": attack.name, **attack.hparams(), "seed": s.seed, "made_on": device},
                "pytorch_accuracy": acc,
                "bn_folded": folded,
                "per_format": checks,
            },
        )
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out)
        done = True
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done and created is not None:  # folders this call made for --out, empty again
            shutil.rmtree(created, ignore_errors=True)
    return ExportResult(out=out, files={n: out / fmt.FORMATS[n].filename for n in names}, metadata=meta, lines=lines)


__all__ = ["ATOL", "ATTACK", "ExportResult", "ExportSettings", "METADATA", "VerificationError", "export"]
