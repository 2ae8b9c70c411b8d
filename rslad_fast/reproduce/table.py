"""The sweep's results: Table 2 (``table2.md``, ``.csv``, ``.json``: ours beside the paper's) and the training
curves per student (``curves-<student>.png``), each file written atomically; and where the test set comes from."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Optional

from rslad_fast.atomic import atomic_write_bytes
from rslad_fast.engine.rundir import TEACHER, RunDir
from rslad_fast.engine.validation import short
from rslad_fast.errors import UserError
from rslad_fast.evaluation.robustness import COLUMNS

from .paper import METHOD_NAMES, MODEL_NAMES, PAPER

# The official releases' files and md5, as torchvision's CIFAR10 / CIFAR100 record them (base_folder,
# train_list + test_list; tests/test_reproduce.py checks the copy): copied, since importing
# torchvision.datasets costs about 2 s of every sweep's start on a 2-core CPU, for two short lists
OFFICIAL_MD5 = {
    "cifar10": (
        "cifar-10-batches-py",
        (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
        ),
    ),
    "cifar100": (
        "cifar-100-python",
        (("train", "16019d7e3df5f24257cddd939b257f8d"), ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")),
    ),
}


def provenance(data_root: str, dataset: str, given: Optional[str]) -> dict:
    """Where the evaluation's test set comes from: the files' md5 against torchvision's record of the
    official release says whether it is the official one (a re-encoded copy, as ../shared/data's JPEG
    CIFAR-10, is not, and its accuracies land near, not on, published ones)."""
    out = {"root": data_root, "dataset": dataset, "given": given}
    if dataset not in OFFICIAL_MD5:
        out["official"] = None
        return out
    base_folder, files = OFFICIAL_MD5[dataset]
    folder = Path(data_root)
    if folder.name != base_folder:
        folder = folder / base_folder
    mismatched = []
    for name, md5 in files:
        try:
            digest = hashlib.md5((folder / name).read_bytes()).hexdigest()
        except OSError:
            digest = None
        if digest != md5:
            mismatched.append(name)
    out["official"] = not mismatched
    out["differs"] = mismatched
    return out


def provenance_text(prov: dict) -> str:
    parts = [prov["given"]] if prov.get("given") else []
    if prov.get("official") is True:
        parts.append(f"{prov['dataset']} files identical (md5) to the official release")
    elif prov.get("official") is False:
        parts.append(
            f"not the official {prov['dataset']} files ({', '.join(prov['differs'])} differ from the official "
            f"release's md5)"
            + (
                ": e.g. a JPEG re-encoded copy, whose accuracies land near, not on, published figures"
                if prov["dataset"] == "cifar10"
                else ""
            )
        )
    return "; ".join(parts) + f" ({prov['root']})"


def dataset_of(plan) -> str:
    return plan.run_settings.dataset or "cifar10"


def collect(plan) -> list:
    """The table's rows: one per (run, checkpoint) with ours, the paper's and the difference per column (the
    paper's CIFAR-10 figures, so on CIFAR-10 only)."""
    rows = []
    figures = PAPER if dataset_of(plan) == "cifar10" else {}
    for s in plan.stages:
        if s.kind != "evaluate":
            continue
        report = _eval_report(RunDir(s.run_dir).eval_json)
        for r in report["rows"]:
            paper = figures.get((s.student, s.method), {}) if r["label"] == "last" else {}
            cols = {}
            for c in report["columns"]:
                ours = r["accuracy"][c]
                theirs = paper.get(c)
                cols[c] = {"ours": ours, "paper": theirs, "diff": None if theirs is None else ours - theirs}
            rows.append(
                {
                    "model": MODEL_NAMES.get(s.student, s.student),
                    "student": s.student,
                    "method": METHOD_NAMES.get(s.method, s.method),
                    "checkpoint": r["label"],
                    "selection": r.get("selection"),  # what picked best.pt (engine/validation.py); None: last
                    "n": report["n"],
                    "columns": cols,
                    "warnings": r.get("warnings", []),
                    "run": str(s.run_dir),
                }
            )
    return rows


def _eval_report(path: Path) -> dict:
    """A run's eval.json, read just after the sweep checked or wrote it; changed since (by hand, by another
    process) it is one line naming it: the rerun that it advises evaluates that run again."""
    try:
        report = json.loads(path.read_text())
        for r in report["rows"]:
            for c in report["columns"]:
                float(r["accuracy"][c])
        return report
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{path}: not a readable evaluation report ({why})") from None


def _cell(c: dict) -> str:
    if c["paper"] is None:
        return f"{c['ours']:.2f}"
    return f"{c['ours']:.2f} ({c['paper']:.2f}, {c['diff']:+.2f})"


def write_table(plan, rows: list, prov: dict) -> list:
    columns = list(plan.opts.attacks)
    ns = sorted({r["n"] for r in rows})
    head = ["model", "method", "checkpoint", "best picked by"] + [COLUMNS[c] for c in columns]
    md = [
        f"# Table 2, reproduced ({dataset_of(plan)}, {plan.opts.preset} preset)",
        "",
        "Each cell: ours (the paper's, ours - paper). The paper's figures (Zi et al., ICCV 2021, Table 2, as "
        "../shared/METHODS.md transcribes them) are CIFAR-10's, of the last checkpoint: only CIFAR-10's `last` "
        "rows have them.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        picked = short(r["selection"]) if r.get("selection") else "—"
        cells = [r["model"], r["method"], r["checkpoint"], picked] + [_cell(r["columns"][c]) for c in columns]
        md.append("| " + " | ".join(cells) + " |")
    md += [
        "",
        f"- Test images: {', '.join(map(str, ns))} (the first N of the test set).",
        "- best picked by: test-subset (N): best.pt is the epoch with the best PGD-20 on the first N test images, "
        "the official RSLAD script's selection (on the test set), the default for reproduction; validation (N): "
        "on N training images held out of training (--val-n).",
        f"- Data: {provenance_text(prov)}.",
        f"- Preset: {plan.opts.preset}; train flags: {json.dumps(plan.settings['train_flags'])}; "
        f"evaluate flags: {' '.join(plan.settings['evaluate_flags'])}.",
        f"- Runs: {', '.join(dict.fromkeys(r['run'] for r in rows))} (each holds config.json, metrics.jsonl, "
        "eval.json).",
    ]
    if plan.run_settings.tensorboard:  # every run's RUN_DIR/tensorboard (its teacher's too) under --out
        md.append(f"- TensorBoard: `tensorboard --logdir {plan.out}` shows every run of the sweep in one view.")
    for r in rows:
        md += [f"- WARNING {r['method']} {r['model']} {r['checkpoint']}: {w}" for w in r["warnings"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["model", "method", "checkpoint", "n"]
        + [f"{c}_{k}" for c in columns for k in ("ours", "paper", "diff")]
        + ["best_selection"]
    )
    for r in rows:
        vals = [r["columns"][c][k] for c in columns for k in ("ours", "paper", "diff")]
        picked = short(r["selection"]) if r.get("selection") else ""
        w.writerow(
            [r["model"], r["method"], r["checkpoint"], r["n"]]
            + ["" if v is None else f"{v:.4f}" for v in vals]
            + [picked]
        )
    doc = {"columns": {c: COLUMNS[c] for c in columns}, "rows": rows, "data": prov, "plan": plan.settings}
    paths = [plan.out / "table2.md", plan.out / "table2.csv", plan.out / "table2.json"]
    for path, text in zip(paths, ("\n".join(md) + "\n", buf.getvalue(), json.dumps(doc, indent=2) + "\n")):
        atomic_write_bytes(path, text.encode())
    return paths


def write_curves(plan) -> tuple:
    """Per student, ``curves-<student>.png``: every method's clean and PGD-20 accuracy and training loss per
    epoch on the held-out subset the runs evaluate after each epoch (the paper's Figs. 2 and 3). Returns the
    paths and notes: a run whose metrics.jsonl is gone or holds no epoch is drawn without (the table does
    not need it), a torn line or a record without a value leaves that point out, never the sweep."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    paths, notes = [], []
    for student in plan.opts.students:
        fig = Figure(figsize=(15, 4.2))
        axes = fig.subplots(1, 3)
        for s in plan.stages:
            if s.kind != "train" or s.student != student or s.name == TEACHER:
                continue
            rd = RunDir(s.run_dir)
            recs = rd.metrics_records()  # the engine's reader: a torn line is skipped
            if not recs:
                why = "missing" if not rd.metrics.exists() else "holds no complete epoch"
                notes.append(f"{rd.metrics}: {why}; curves-{student}.png drawn without {s.name}")
                continue
            ep = [r["epoch"] for r in recs]
            label = METHOD_NAMES.get(s.method, s.method)
            axes[0].plot(ep, [100 * _value(r, "clean_acc") for r in recs], marker="o", label=label)
            axes[1].plot(ep, [100 * _value(r, "pgd20_acc") for r in recs], marker="o", label=label)
            axes[2].plot(ep, [_value(r, "train_loss") for r in recs], marker="o", label=label)
        for ax, title in zip(axes, ("clean accuracy (%)", "PGD-20 accuracy (%)", "training loss (each method's own)")):
            ax.set_title(f"{MODEL_NAMES.get(student, student)}: {title}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # no run to draw: no empty legend (matplotlib warns)
                ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        path = plan.out / f"curves-{student}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths, notes


def _value(record: dict, key: str) -> float:
    """A metrics record's number, NaN (a gap in the curve) where absent or not a number."""
    v = record.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
