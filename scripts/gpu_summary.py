"""The GPU check's one summary: what passed, failed, timed out or was skipped, and every figure it measured.

    python scripts/gpu_summary.py WORK_DIR --md summary.md [--json summary.json]

WORK_DIR is scripts/gpu_check.sh's working folder (machine.txt, plan.tsv, stages.tsv, each stage's log, JUnit
XML and JSON). Written after every stage, so it reads whatever is there and never fails on a missing piece;
each output is written under a temporary name beside it and renamed, so a kill mid-write leaves the last
whole copy.
"""

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_summary import markdown as bench_markdown  # noqa: E402
from bench_summary import summarise as bench_summarise  # noqa: E402


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _junit(path: Path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for s in suites
        for c in s.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    skip_reasons = sorted(
        {
            (c.find("skipped").get("message") or "")[:120]
            for s in suites
            for c in s.iter("testcase")
            if c.find("skipped") is not None
        }
    )
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed_tests": failed,
        "skip_reasons": skip_reasons,
    }


def write_atomic(path, text: str) -> None:
    """`text` to `path` by way of a temporary file in the same folder and a rename (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _int(text, default=None):
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def plan_projection(plan, startup_s, deadline_s):
    """Which planned stages fit if each takes its estimate: the script runs a stage only while its estimate fits
    in what is left before the deadline (`deadline_s` after the start, `startup_s` of it spent before the first
    stage). Returns (fits, does_not_fit) lists of names."""
    fits, not_fit, t = [], [], startup_s
    for name, est in plan:
        if deadline_s - t >= est:
            fits.append(name)
            t += est
        else:
            not_fit.append(name)
    return fits, not_fit


def summarise(work: Path) -> dict:
    machine = dict(line.split(": ", 1) for line in _read(work / "machine.txt").splitlines() if ": " in line)
    stages = []
    for line in _read(work / "stages.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) == 5:
            stages.append(dict(zip(("stage", "status", "seconds", "estimate_s", "note"), parts)))
    plan = []
    for line in _read(work / "plan.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and _int(parts[1]) is not None:
            plan.append((parts[0], int(parts[1])))
    # Planned stages with no record yet: the run has not reached them (or was killed before it did).
    recorded = {st["stage"] for st in stages}
    not_reached = [{"stage": n, "estimate_s": e} for n, e in plan if n not in recorded]
    deadline, startup = _int(machine.get("deadline_s")), _int(machine.get("startup_s"), 0)
    projection = None
    if plan and deadline is not None:
        fits, not_fit = plan_projection(plan, startup, deadline)
        projection = {"deadline_s": deadline, "startup_s": startup, "fits": fits, "does_not_fit": not_fit}
    out = {
        "machine": machine,
        "stages": stages,
        "plan": [{"stage": n, "estimate_s": e} for n, e in plan],
        "not_reached": not_reached,
        "projection": projection,
        "tests": {},
        "probes": {},
        "sanitizer": {},
    }
    for name in ("tests_cuda", "graphs"):
        j = _junit(work / f"{name}.xml")
        if j is not None:
            out["tests"][name] = j
    for name in ("memcheck", "racecheck"):
        text = _read(work / f"{name}.log")
        # memcheck ends with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: N hazards displayed"
        m = re.search(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:error|hazard)", text)
        if text:
            out["sanitizer"][name] = {"errors": int(m.group(1)) if m else None, "probe": _json(work / f"{name}.json")}
    for name in ("sweep", "big_pgd"):
        j = _json(work / f"{name}.json")
        if j is not None:
            out["probes"][name] = j
    out["smoke"] = _json(work / "smoke" / "smoke.json")
    out["bench"] = {}
    # One JSON a benchmark stage (bench_ops, bench_inner, bench_epoch; full mode's bench_full_* a file), in the
    # order the stages ran; a stage's `_compiled` JSON joins its groups (ratios against eager).
    order = {st["stage"]: i for i, st in enumerate(stages)}
    names = {p.stem.removesuffix("_compiled") for p in work.glob("bench_*.json")}
    for name in sorted(names, key=lambda n: (min(order.get(n, 1e9), order.get(n + "_compiled", 1e9)), n)):
        data = _json(work / f"{name}.json")
        compiled = _json(work / f"{name}_compiled.json")  # its rows join their groups: ratios against eager
        if compiled and compiled.get("benchmarks"):
            data = data or {"benchmarks": [], **{k: v for k, v in compiled.items() if k != "benchmarks"}}
            data["benchmarks"] = data["benchmarks"] + compiled["benchmarks"]
        if data and data.get("benchmarks"):
            out["bench"][name] = bench_summarise(data)
    out["quick_compare"] = _read(work / "quick_compare.md") or None
    return out


def markdown(s: dict, work: Path) -> str:
    m = s["machine"]
    lines = [
        "# GPU check",
        "",
        f"- device: {m.get('gpu', '?')} ({m.get('cores', '?')} cores); {m.get('python', '')}; "
        f"torch {m.get('torch', '?')}",
        f"- commit {m.get('commit', '?')}, {m.get('date', '?')}, mode {m.get('mode', '?')}"
        f"{', DRY RUN on the CPU (no GPU figures)' if m.get('dry_run') == 'yes' else ''}",
        "",
        "| stage | status | s | estimate s | note |",
        "|---|---|---|---|---|",
    ]
    for st in s["stages"]:
        note = st["note"].replace("|", "\\|")
        lines.append(f"| {st['stage']} | {st['status']} | {st['seconds']} | {st['estimate_s']} | {note} |")
    for st in s.get("not_reached", []):
        note = "the run ended (or was killed) before it"
        lines.append(f"| {st['stage']} | not reached | - | {st['estimate_s']} | {note} |")
    ran = [st["stage"] for st in s["stages"] if st["status"] != "not run"]
    not_run = [f"{st['stage']} ({st['note']})" for st in s["stages"] if st["status"] == "not run"]
    lines += ["", f"- ran: {', '.join(ran) or 'none'}", f"- not run: {'; '.join(not_run) or 'none'}"]
    if s.get("not_reached"):
        lines.append(f"- not reached: {', '.join(st['stage'] for st in s['not_reached'])}")
    proj = s.get("projection")
    if proj:
        lines.append(
            f"- plan: {len(s['plan'])} stages; with {proj['startup_s']} s of start-up and the "
            f"{proj['deadline_s']} s deadline, if each stage took its estimate these would fit: "
            f"{', '.join(proj['fits']) or 'none'}; and these would not: {', '.join(proj['does_not_fit']) or 'none'}"
        )
    for name, t in s["tests"].items():
        lines += ["", f"**{name}**: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"]
        lines += [f"- FAILED {f}" for f in t["failed_tests"]]
        lines += [f"- skipped: {r}" for r in t["skip_reasons"]]
    for name, san in s["sanitizer"].items():
        probe = san.get("probe") or {}
        lines += [
            "",
            f"**{name}**: {san['errors'] if san['errors'] is not None else '?'} sanitizer errors; "
            f"{probe.get('cases', '?')} op cases, {len(probe.get('failures', []))} mismatches",
        ]
    for name, p in s["probes"].items():
        if name == "sweep":
            lines += [
                "",
                f"**sweep** ({p.get('device')}): {p.get('cases')} op cases, {len(p.get('failures', []))} "
                f"mismatches, worst relative error {p.get('worst_rel_err'):.2e}",
            ]
        else:
            gbps, first = p.get("GB_per_s"), p.get("first_call_s")
            lines += [
                "",
                f"**big_pgd** ({p.get('device')}): {p.get('numel')} fp16 elements "
                f"(past 2^31: {p.get('over_2^31')}), {p.get('mismatched')} mismatches against the reference, "
                f"{p.get('seconds', 0) * 1e3:.1f} ms"
                + (f" (best of {p.get('repeats')} after a warm-up)" if p.get("repeats") else "")
                + (f", {gbps:.3g} GB/s" if gbps else "")
                + (f"; first call {first * 1e3:.1f} ms" if first is not None else ""),
            ]
    smoke_md = _read(work / "smoke" / "smoke.md")
    if smoke_md:
        lines += ["", "## Training smoke (one epoch each, generated data)", "", smoke_md.rstrip()]
    for name, b in s["bench"].items():
        lines += ["", f"## Benchmarks: {name}", "", bench_markdown(b).rstrip()]
    if s.get("quick_compare"):
        lines += ["", "## Quick preset, fp32 vs bf16", "", s["quick_compare"].rstrip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work")
    p.add_argument("--md", required=True)
    p.add_argument("--json")
    args = p.parse_args(argv)
    work = Path(args.work)
    s = summarise(work)
    write_atomic(args.md, markdown(s, work))
    if args.json:
        write_atomic(args.json, json.dumps(s, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
