"""Compare the final clean and PGD-20 accuracy of two training runs (e.g. fp32 vs bf16 on the quick preset).

    python scripts/compare_runs.py RUN_A RUN_B [--tolerance 0.5] [--md out.md]
Exit 0 when both differences are within the tolerance (in accuracy points), 1 otherwise, 2 on bad input.
"""

import argparse
import json
import os
import sys


def last_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no epochs")
    return rows[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--tolerance", type=float, default=0.5, help="allowed difference, accuracy points")
    p.add_argument("--md", help="write the comparison as Markdown here")
    args = p.parse_args(argv)
    try:
        a, b = last_metrics(args.run_a), last_metrics(args.run_b)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [f"| metric | {args.run_a} | {args.run_b} | difference (points) |", "|---|---|---|---|"]
    ok = True
    for key in ("clean_acc", "pgd20_acc"):
        diff = 100 * (b[key] - a[key])
        ok &= abs(diff) <= args.tolerance
        lines.append(f"| {key} | {100 * a[key]:.2f} | {100 * b[key]:.2f} | {diff:+.2f} |")
    lines.append(f"\nWithin {args.tolerance} points: {'yes' if ok else 'NO'}")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
