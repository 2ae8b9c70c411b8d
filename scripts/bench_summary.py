"""Summarise a pytest-benchmark JSON file: per group, each row's median and its speed-up over the group's
baseline row (the eager reference), all measured side by side in the same run.

    python scripts/bench_summary.py benchmarks.json [--json summary.json] [--md summary.md]
"""

import argparse
import json
import sys
from collections import defaultdict

# The baseline of a group is its first row whose impl appears here, in this order.
BASELINES = ("eager-backward", "backward() loop", "official", "reference", "eager", "dataloader")


def summarise(data):
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        groups[bench.get("group") or bench["name"]].append(
            {
                "name": bench["name"],
                "impl": info.get("impl", bench["name"]),
                "median_s": bench["stats"]["median"],
                "iqr_s": bench["stats"]["iqr"],
                "rounds": bench["stats"]["rounds"],
                "images_per_s": info.get("images_per_s"),
                "extra": info,
            }
        )
    out = []
    for group, rows in groups.items():
        base = next((r for b in BASELINES for r in rows if r["impl"] == b), None)
        for r in rows:
            r["speedup"] = base["median_s"] / r["median_s"] if base else None
        out.append({"group": group, "baseline": base["impl"] if base else None, "rows": rows})
    machine = data.get("machine_info", {})
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    return {
        "device": first.get("device"),
        "torch": first.get("torch"),
        "commit": first.get("commit"),
        "datetime": data.get("datetime"),
        "cpu": machine.get("cpu", {}).get("brand_raw"),
        "groups": out,
    }


def markdown(summary):
    lines = [
        f"Device: {summary['device']}; torch {summary['torch']}; commit {summary['commit']}; {summary['datetime']}",
        "",
    ]
    for g in summary["groups"]:
        lines += [
            f"### {g['group']}",
            "",
            "| impl | median | speed-up vs " + str(g["baseline"]) + " | img/s |",
            "|---|---|---|---|",
        ]
        for r in g["rows"]:
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
            lines.append(f"| {r['impl']} | {r['median_s'] * 1e3:.3f} ms | {sp} | {ips} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmark_json")
    p.add_argument("--json", help="write the summary as JSON here")
    p.add_argument("--md", help="write the summary as Markdown here")
    args = p.parse_args(argv)
    try:
        with open(args.benchmark_json) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.benchmark_json}: {e}", file=sys.stderr)
        return 2
    summary = summarise(data)
    text = markdown(summary)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
