"""The evaluation report: the table in the paper's layout, ``eval.json`` (numbers, configuration, device,
versions, n, seed, timings, warnings) and ``eval.md`` (the table and the same facts, for people), each
written atomically."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from rslad_fast.atomic import atomic_write_bytes
from rslad_fast.data.cifar import DATASETS
from rslad_fast.engine.rundir import EVAL_JSON, EVAL_MD
from rslad_fast.errors import UserError

from .robustness import ATTACKS, COLUMNS, WORST

FORMAT = "rslad_fast.eval/1"
WORST_LABEL = "Worst (all ran)"


def _pretty(v):
    """Floats that are k/255 also shown as such (eps 8/255, step 2/255)."""
    if isinstance(v, float) and 0 < v < 1 and abs(v * 255 - round(v * 255)) < 1e-6:
        return f"{v:.6g} (={round(v * 255)}/255)"
    return str(v)


def _fmt(v):
    return "—" if v is None else f"{v:.2f}"


def table(rows: list, columns: list) -> str:
    """Markdown table in the paper's layout: one row per checkpoint."""
    head = ["checkpoint", "model", "method"] + [COLUMNS[c] for c in columns] + [WORST_LABEL]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(columns) + 1)) + "|"]
    for r in rows:
        cells = [r["label"], r["arch"], r["method"] or "—"] + [_fmt(r["accuracy"].get(c)) for c in columns]
        cells.append(_fmt(r["accuracy"][WORST]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """eval.md: the table, the warnings, every attack's settings and the setup, for people."""
    cfg = report["config"]
    cols = report["columns"]
    lines = [
        f"# Robustness evaluation ({report['data']['split']}, first {report['n']} images, "
        f"eps = {cfg['eps']:.6g} = {cfg['eps'] * 255:.4g}/255)",
        "",
        table(report["rows"], cols),
        "",
        f"*{WORST_LABEL}*: per image, correct on the clean image AND under every attack that ran "
        f"({', '.join(COLUMNS[c] for c in report['attacks_run'])}). "
        f"AA is AutoAttack's own per-image worst case over its four attacks.",
        "",
    ]
    sanity_rows = [r for r in report["rows"] if r.get("sanity")]
    if sanity_rows:
        s = sanity_rows[0]["sanity"]
        lines.append(
            f"Sanity (PGD-{s['steps']}, eps {s['eps']:g}, step {s['alpha']:g}; must be <= "
            f"{s['chance']:.2f}% chance): "
            + ", ".join(f"{r['label']} {r['sanity']['accuracy']:.2f}%" for r in sanity_rows)
        )
        lines.append("")
    lines += [f"Note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines.append("## Warnings")
    warns = [f"- {r['label']}: {w}" for r in report["rows"] for w in r["warnings"]]
    lines += (warns or ["none"]) + ["", "## Attacks"]
    for name, hp in cfg["attacks"].items():
        what = ", ".join(f"{k}={_pretty(v)}" for k, v in hp.items()) or "the natural images, no attack"
        lines.append(f"- {COLUMNS.get(name, name)} (`{name}`): {what}")
    if "autoattack" in cfg:
        aa = cfg["autoattack"]
        lines.append(f"- AutoAttack run configuration: {json.dumps(aa, sort_keys=False)}")
    lines += [
        "",
        "## Setup",
        "- checkpoints: " + ", ".join(f"`{r['checkpoint']}`" for r in report["rows"]),
    ]
    lines += [
        f"- {r['label']} picked by: {r['selection']['name']}, {r['selection']['text']}"
        for r in report["rows"]
        if r.get("selection")
    ]
    lines += [
        f"- data: `{report['data']['root']}` ({report['data']['split']}, first {report['n']} images)",
        f"- device: {report['device']} ({report['device_name']}), torch {report['torch']}, python "
        f"{report['python']}, tf32 {'allowed' if cfg['allow_tf32'] else 'off'}",
        f"- seed {report['seed']}, batch size {cfg['batch_size']}",
        f"- started {report['time']['started']}, {report['time']['seconds']:.1f} s",
        f"- command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def build(
    *,
    args,
    argv,
    command=None,
    attacks: dict,
    sanity,
    rows: list,
    n: int,
    device: torch.device,
    world_size: int,
    started,
    seconds: float,
    out,
    notes: list,
    dataset: str = "cifar10",
    wrn70_16_norm: str = "cifar10",
) -> dict:
    """The report of one evaluation (what eval.json holds): ``rows`` (one per checkpoint) and the facts
    that make them reproducible: the parsed flags ``args``, each attack's hyperparameters, AutoAttack's
    configuration as it ran, the device and versions, the command line (``argv``; None: sys.argv)."""
    config = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    config.update(dataset=dataset, wrn70_16_norm=wrn70_16_norm)  # as resolved (from the run's config.json)
    config["attacks"] = {name: a.hparams() for name, a in attacks.items()}
    if sanity is not None:
        config["sanity_attack"] = sanity.hparams()
    if "aa" in attacks and attacks["aa"].last_config is not None:
        aa_cfg = dict(attacks["aa"].last_config)
        aa_cfg.pop("device_per_attack", None)
        config["autoattack"] = aa_cfg
    try:
        aa_version = metadata.version("pyautoattack")
    except Exception:
        aa_version = None
    return {
        "format": FORMAT,
        "columns": [c for c in ATTACKS if c in attacks],
        "attacks_run": [c for c in ATTACKS if c in attacks or c == "clean"],
        "column_names": {**COLUMNS, WORST: WORST_LABEL},
        "rows": rows,
        "n": n,
        "n_requested": args.n,
        "seed": args.seed,
        "dataset": dataset,
        "data": {"root": str(args.data), "dataset": dataset, "split": f"{DATASETS[dataset].title} test"},
        "config": config,
        "device": str(device),
        "world_size": world_size,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "pyautoattack": aa_version,
        "python": platform.python_version(),
        "command": command
        or " ".join(["python -m rslad_fast.evaluate"] + list(sys.argv[1:] if argv is None else argv)),
        "time": {"started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 3)},
        "out": str(out),
        "notes": notes,
    }


def write(report: dict) -> tuple:
    """Write eval.json and eval.md into the report's --out folder; returns their paths."""
    out = Path(report["out"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror or e}") from None
    json_path, md_path = out / EVAL_JSON, out / EVAL_MD
    atomic_write_bytes(json_path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    atomic_write_bytes(md_path, markdown(report).encode())
    return json_path, md_path
