"""The GPU check's one summary: what passed, failed, timed out or was skipped, and every figure it measured.

    python scripts/gpu_summary.py WORK_DIR --md summary.md [--json summary.json]

WORK_DIR is scripts/gpu_check.sh's working folder (machine.txt, stages.tsv, each stage's log, JUnit XML and
JSON). Written after every stage, so it reads whatever is there and never fails on a missing piece.
"""

import argparse
import json
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


def summarise(work: Path) -> dict:
    machine = dict(line.split(": ", 1) for line in _read(work / "machine.txt").splitlines() if ": " in line)
    stages = []
    for line in _read(work / "stages.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) == 5:
            stages.append(dict(zip(("stage", "status", "seconds", "estimate_s", "note"), parts)))
    out = {"machine": machine, "stages": stages, "tests": {}, "probes": {}, "sanitizer": {}}
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
    for name in ("bench_ops", "bench_inner", "bench_epoch", "bench_full"):
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
        lines.append(f"| {st['stage']} | {st['status']} | {st['seconds']} | {st['estimate_s']} | {st['note']} |")
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
            gbps = p.get("GB_per_s")
            lines += [
                "",
                f"**big_pgd** ({p.get('device')}): {p.get('numel')} fp16 elements "
                f"(past 2^31: {p.get('over_2^31')}), {p.get('mismatched')} mismatches against the reference, "
                f"{p.get('seconds', 0) * 1e3:.1f} ms" + (f", {gbps:.0f} GB/s" if gbps else ""),
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
    Path(args.md).write_text(markdown(s, work))
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
