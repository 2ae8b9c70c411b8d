"""Training smoke for scripts/gpu_check.sh: every method, one short epoch, through the real CLI.

    python scripts/gpu_smoke.py --out DIR [--device cuda] [--tiny]

On generated CIFAR-shaped data (tests/fake_cifar.py), in one process (the CLI's `main`, so
imports and CUDA start-up are paid once):
- each registered method in fp32 and in bf16, MobileNetV2 students (a distillation method distils from a
  saved random ResNet-8 teacher file: the smoke is about the code paths, not accuracy);
- RSLAD on generated CIFAR-100 (100 classes, the official CIFAR-100 loss, an fp16 teacher as the
  official scripts' `teacher.half()`), fp32 and bf16;
- AdaAD on the same CIFAR-100 data, fp32 and bf16: the teacher inside the attack, so each attack step's input
  gradient runs back through the fp16 teacher (and its loss is the official CIFAR-100 per-image sum);
- RSLAD with the CUDA-graph attack on and off, fp32 and bf16: the graph replays the eager loop's kernels, so
  the two runs must give the same epoch loss. cuDNN runs deterministic algorithms here (the engine's
  cudnn.benchmark alone may pick non-deterministic weight-gradient kernels, whose rounding SGD then
  carries); the tolerance (GRAPH_RTOL) still allows for the rounding of bf16 passes;
- `python -m rslad_fast.evaluate` of the RSLAD fp32 run on this device, all six attacks (AutoAttack from the
  carried pyautoattack);
- then `torchrun --nproc_per_node=1` of an RSLAD run (NCCL on CUDA, gloo on the CPU).
Writes DIR/smoke.json and DIR/smoke.md; exit status 1 when any run failed or a graph pair disagreed.
`--tiny`: the 5k-parameter model and a handful of images (the CPU dry run).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # the test data writer, fake_cifar
from fake_cifar import write_fake_cifar10, write_fake_cifar100  # noqa: E402

from rslad_fast import methods, train  # noqa: E402
from rslad_fast.models import build  # noqa: E402

GRAPH_RTOL = {"fp32": 1e-4, "bf16": 1e-3}


def _train_argv(args, data, run_dir, method):
    """The command line every smoke run shares: one short epoch of `method` on the generated data."""
    return [
        "--method", method, "--student", args.student, "--data", str(data), "--out", str(run_dir),
        "--epochs", "1", "--batch-size", str(args.batch_size), "--train-n", str(args.train_n),
        "--eval-n", str(args.eval_n), "--device", args.device, "--no-progress", "--overwrite",
    ]  # fmt: skip


def _last_metrics(run_dir, row, *keys):
    """Add the run's last metrics.jsonl record (train loss, clean and PGD-20 accuracy, `keys`) to `row`."""
    metrics = run_dir / "metrics.jsonl"
    if row["rc"] == 0 and metrics.is_file():
        rec = json.loads(metrics.read_text().splitlines()[-1])
        row.update({k: rec.get(k) for k in ("train_loss", "clean_acc", "pgd20_acc", *keys)})
    print(json.dumps(row), flush=True)
    return row


def _one(args, data, teacher, out, method, amp, graph, dataset="cifar10"):
    run_dir = out / f"{method}-{amp}-{'graph' if graph else 'eager'}{'' if dataset == 'cifar10' else '-' + dataset}"
    argv = _train_argv(args, data, run_dir, method) + ["--amp", amp, "--dataset", dataset]
    if methods.get(method).needs_teacher:
        argv += ["--teacher", str(teacher), "--teacher-arch", args.teacher_arch]
    if getattr(methods.get(method), "needs_nat_teacher", False):  # MTARD: the same random file as its natural one
        argv += ["--nat-teacher", str(teacher), "--nat-teacher-arch", args.teacher_arch]
    if method == "rslad":  # on: required on CUDA (an error if it cannot be used), auto (eager) on the CPU dry run
        argv += ["--cuda-graph", ("true" if args.device.startswith("cuda") else "auto") if graph else "false"]
    t0 = time.perf_counter()
    try:
        rc = train.main(argv)
    except Exception as e:  # noqa: BLE001  (recorded: the smoke reports every run)
        rc, error = 1, f"{type(e).__name__}: {e}"
    else:
        error = None
    row = {
        "method": method if dataset == "cifar10" else f"{method} {dataset} (fp16 teacher)",
        "amp": amp,
        "graph": graph,
        "rc": rc,
        "error": error,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return _last_metrics(run_dir, row, "images_per_s")


def _torchrun(args, data, teacher, out):
    run_dir = out / "torchrun-rslad"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", "-m"]
    cmd += ["rslad_fast.train"] + _train_argv(args, data, run_dir, "rslad")
    cmd += ["--teacher", str(teacher), "--teacher-arch", args.teacher_arch]
    t0 = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torchrun_timeout, env=env)
    row = {
        "method": "rslad (torchrun, 1 process)",
        "amp": "fp32",
        "graph": True,
        "rc": done.returncode,
        "error": done.stderr[-1500:] if done.returncode else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return _last_metrics(run_dir, row, "world_size")


def _evaluate(args, data, out):
    from rslad_fast import evaluate

    run_dir = out / "rslad-fp32-graph"
    t0 = time.perf_counter()
    try:
        rc = evaluate.main(
            [
                "--run",
                str(run_dir),
                "--data",
                str(data),
                "--no-download",
                "--n",
                str(args.eval_n),
                "--device",
                args.device,
                "--no-progress",
            ]
        )
    except Exception as e:  # noqa: BLE001
        rc, error = 1, f"{type(e).__name__}: {e}"
    else:
        error = None
    row = {
        "method": "evaluate rslad fp32 (6 attacks)",
        "amp": "fp32",
        "graph": False,
        "rc": rc,
        "error": error,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    report = run_dir / "eval.json"
    if rc == 0 and report.is_file():
        r = json.loads(report.read_text())["rows"][-1]
        row["accuracy"] = r["accuracy"]
    print(json.dumps(row), flush=True)
    return row


def _markdown(rows, pairs):
    lines = [
        "| method | amp | graph | rc | train loss | clean | PGD-20 | img/s | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def f(k, fmt, r=r):
            return (fmt % r[k]) if r.get(k) is not None else "-"

        lines.append(
            f"| {r['method']} | {r['amp']} | {'on' if r['graph'] else 'off'} | {r['rc']} | "
            f"{f('train_loss', '%.5f')} | {f('clean_acc', '%.3f')} | {f('pgd20_acc', '%.3f')} | "
            f"{f('images_per_s', '%.0f')} | {r['seconds']} |"
        )
    lines += [
        "",
        "| RSLAD graph on vs off | loss on | loss off | rel. difference | within GRAPH_RTOL |",
        "|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(f"| {p['amp']} | {p['on']} | {p['off']} | {p['rel_diff']} | {p['ok']} |")
    for r in rows:
        if r.get("accuracy"):
            lines += ["", f"{r['method']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["accuracy"].items())]
    errors = [f"- {r['method']} {r['amp']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def training_cases():
    """The smoke's training runs, in order, as (method, amp, graph, dataset): every registered method in fp32
    and bf16 on CIFAR-10 (RSLAD with the CUDA-graph attack on and off), then RSLAD and AdaAD on CIFAR-100 with
    the fp16 teacher (AdaAD: the teacher inside the attack, its input gradient through the fp16 teacher)."""
    cases = []
    for method in methods.names():
        for amp in ("fp32", "bf16"):
            cases.append((method, amp, True, "cifar10"))
            if method == "rslad":
                cases.append((method, amp, False, "cifar10"))
    for method in ("rslad", "adaad"):
        cases += [(method, amp, True, "cifar100") for amp in ("fp32", "bf16")]
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and data (the CPU dry run)")
    p.add_argument("--no-torchrun", action="store_true")
    p.add_argument("--torchrun-timeout", type=int, default=180)
    args = p.parse_args(argv)
    args.student, args.teacher_arch = ("tiny", "tiny") if args.tiny else ("mnv2", "resnet8")
    args.batch_size, args.train_n, args.eval_n = (16, 32, 16) if args.tiny else (128, 512, 128)
    torch.backends.cudnn.deterministic = True  # see the module doc: graph on vs off must be comparable
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    write_fake_cifar10(data, n_train=args.train_n, n_test=max(args.eval_n, 16), seed=0)
    torch.manual_seed(0)
    teacher = out / "teacher.pt"
    torch.save(build(args.teacher_arch).state_dict(), teacher)

    cases = training_cases()
    rows = [_one(args, data, teacher, out, m, amp, graph=g) for m, amp, g, ds in cases if ds == "cifar10"]
    pairs = []
    for amp in ("fp32", "bf16"):
        on, off = (
            next((r for r in rows if r["method"] == "rslad" and r["amp"] == amp and r["graph"] == g), {})
            for g in (True, False)
        )
        if "train_loss" in on and "train_loss" in off:
            rel = abs(on["train_loss"] - off["train_loss"]) / max(abs(off["train_loss"]), 1e-12)
            pairs.append(
                {
                    "amp": amp,
                    "on": on["train_loss"],
                    "off": off["train_loss"],
                    "rel_diff": f"{rel:.2e}",
                    "ok": rel <= GRAPH_RTOL[amp],
                }
            )
        else:
            pairs.append({"amp": amp, "on": None, "off": None, "rel_diff": "-", "ok": False})
    data100, teacher100 = out / "data100", out / "teacher100.pt"
    write_fake_cifar100(data100, n_train=args.train_n, n_test=max(args.eval_n, 16), seed=0)
    torch.save(build(args.teacher_arch, 100).state_dict(), teacher100)
    rows += [
        _one(args, data100, teacher100, out, m, amp, graph=g, dataset=ds) for m, amp, g, ds in cases if ds == "cifar100"
    ]
    rows.append(_evaluate(args, data, out))
    if not args.no_torchrun:
        rows.append(_torchrun(args, data, teacher, out))
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "rows": rows,
        "graph_pairs": pairs,
    }
    (out / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "smoke.md").write_text(_markdown(rows, pairs))
    print(_markdown(rows, pairs))
    failed = [r for r in rows if r["rc"] != 0] + [q for q in pairs if not q["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
