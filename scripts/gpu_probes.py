"""Op probes for scripts/gpu_check.sh (also runnable on their own).

    python scripts/gpu_probes.py sweep [--device cuda] [--large-rows N] [--json FILE]
        every op, dtype and reduction at odd sizes (classes 1, 31, 33, 1000; rows 1, 513 and a large count
        that takes the row kernels' grid-stride path), each checked against the pure-PyTorch reference; small
        enough to run under compute-sanitizer memcheck and racecheck.
    python scripts/gpu_probes.py big-pgd [--device cuda] [--numel N] [--chunk C] [--repeats R] [--json FILE]
        pgd_step_ on N fp16 elements (default 2^31 + 4099: past 32-bit indexing), checked against the
        reference chunk by chunk; timed after a warm-up call (best of --repeats).

Exit status 1 on any mismatch, with the failing case printed; the JSON holds every case's worst error.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rslad_fast import ops  # noqa: E402
from rslad_fast.ops import reference  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # relative to scale
CLASSES = (1, 31, 33, 1000)
ROWS = (1, 513)


def _rel_err(a, b):
    """max |a - b| / max(|b|, 1), where equal entries (infinities and NaNs in the same places included)
    count as exact: an fp16 sum over many rows overflows to inf in the op and the reference alike."""
    a, b = a.double(), b.double()
    if (torch.isnan(a) != torch.isnan(b)).any():
        return float("inf")
    if not a.numel():
        return 0.0
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = (a - b).abs().masked_fill(same, 0).max().item()
    finite = b[torch.isfinite(b)]
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
    return diff / scale


def sweep(device, large_rows):
    cases, failures = [], []
    g = torch.Generator().manual_seed(0)
    shapes = [(r, c) for r in ROWS for c in CLASSES] + [(large_rows, 10)]
    for dtype, (rows, classes) in itertools.product(DTYPES, shapes):
        if rows * classes > 2_000_000 and dtype != torch.float32:
            continue  # the large-row case once, in float32: it is about indexing, not precision
        s0 = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(device, dtype)
        t0 = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(device, dtype)
        for reduction in ops.REDUCTIONS:
            outs, grads = [], []
            for fn in (ops.softmax_kl, reference.softmax_kl):
                s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
                out = fn(s, t, 2.0, reduction)
                gout = torch.ones_like(out)
                grads.append(torch.autograd.grad(out, (s, t), gout))
                outs.append(out.detach())
            err = max(
                _rel_err(outs[0], outs[1]), _rel_err(grads[0][0], grads[1][0]), _rel_err(grads[0][1], grads[1][1])
            )
            case = {
                "op": "softmax_kl",
                "dtype": str(dtype),
                "rows": rows,
                "classes": classes,
                "reduction": reduction,
                "rel_err": err,
            }
            cases.append(case)
            if not err <= TOL[dtype]:
                failures.append(case)
    for dtype, shape in itertools.product(DTYPES, [(1,), (513, 3, 7, 5), (large_rows, 3, 2, 2)]):
        x_nat = torch.rand(shape, generator=g).to(device, dtype)
        x_adv = (x_nat.double() + (torch.rand(shape, generator=g) - 0.5).to(device) * 0.1).to(dtype)
        grad = (
            torch.randn(shape, generator=g)
            .to(device, dtype)
            .masked_fill(torch.rand(shape, generator=g).to(device) < 0.1, 0)
        )
        expected = reference.pgd_step_(x_adv.clone(), grad, x_nat, 8 / 255, 2 / 255)
        got = ops.pgd_step_(x_adv.clone(), grad, x_nat, 8 / 255, 2 / 255)
        case = {"op": "pgd_step_", "dtype": str(dtype), "shape": list(shape), "equal": bool(torch.equal(got, expected))}
        cases.append(case)
        if not case["equal"]:
            failures.append(case)
    if device != "cpu":
        torch.cuda.synchronize()
    return cases, failures


def big_pgd(device, numel, chunk, repeats=3):
    """pgd_step_ over `numel` fp16 elements against the reference, chunk by chunk (the reference's float32
    temporaries for all of it would need 3 x 4 bytes per element more).

    The first call is a warm-up, timed on its own (`first_call_s`: the kernel's module load and first launch);
    `seconds` and GB/s are the best of `repeats` warm calls, each from the same input (x_adv restored from a
    copy before each, outside the timed region); the last call's result is the one checked."""
    g = torch.Generator(device=device).manual_seed(0)
    x_nat = torch.rand(numel, generator=g, device=device, dtype=torch.float16)
    grad = torch.randn(numel, generator=g, device=device, dtype=torch.float16)
    x_adv = x_nat + 0.05 * torch.randn(numel, generator=g, device=device, dtype=torch.float16)
    before = x_adv.clone()

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def timed_step():
        sync()
        t0 = time.perf_counter()
        ops.pgd_step_(x_adv, grad, x_nat, 8 / 255, 2 / 255)
        sync()
        return time.perf_counter() - t0

    first_call_s = timed_step()  # warm-up: module load, first launch (x_adv is restored below)
    times = []
    for _ in range(max(repeats, 1)):
        x_adv.copy_(before)
        times.append(timed_step())
    seconds = min(times)
    mismatched, first_bad = 0, None
    for lo in range(0, numel, chunk):
        hi = min(lo + chunk, numel)
        expected = reference.pgd_step_(before[lo:hi].clone(), grad[lo:hi], x_nat[lo:hi], 8 / 255, 2 / 255)
        bad = (expected != x_adv[lo:hi]).sum().item()
        if bad and first_bad is None:
            first_bad = lo + int((expected != x_adv[lo:hi]).nonzero()[0].item())
        mismatched += bad
    gbytes = 4 * 2 * numel / 1e9  # read x_adv, grad, x_nat, write x_adv: 4 fp16 passes
    return {
        "op": "pgd_step_",
        "dtype": "float16",
        "numel": numel,
        "over_2^31": numel > 2**31,
        "mismatched": mismatched,
        "first_mismatch": first_bad,
        "seconds": seconds,
        "first_call_s": first_call_s,
        "repeats": len(times),
        "GB_per_s": gbytes / seconds if seconds > 0 else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("sweep", "big-pgd"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--large-rows",
        type=int,
        default=600_000,
        help="rows of the large case (over 65,535 blocks x 8 rows: the grid-stride path)",
    )
    p.add_argument("--numel", type=int, default=2**31 + 4099)
    p.add_argument("--chunk", type=int, default=2**27)
    p.add_argument("--repeats", type=int, default=3, help="big-pgd: timed calls after the warm-up, best taken")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    print(f"ops backend {ops.backend()}, CUDA kernels {ops.cuda_kernels_available()}, device {args.device}")
    if args.probe == "sweep":
        cases, failures = sweep(args.device, args.large_rows)
        result = {
            "probe": "sweep",
            "device": args.device,
            "cases": len(cases),
            "failures": failures,
            "worst_rel_err": max((c.get("rel_err", 0.0) for c in cases), default=0.0),
        }
    else:
        r = big_pgd(args.device, args.numel, args.chunk, args.repeats)
        failures = [r] if r["mismatched"] else []
        result = {"probe": "big-pgd", "device": args.device, **r}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    for f in failures:
        print("MISMATCH", json.dumps(f))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
