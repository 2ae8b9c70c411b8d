"""Benchmark utilities: devices, honest synchronisation, provenance of every figure, JSON results.

On the CPU the files run at small sizes; on CUDA the same files run at full sizes.
"""

import json
import os
import platform
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# RSLAD_FAST_BENCH_SIZE: "full" (default), or "reduced" for scripts/gpu_check.sh's one short run on a bare
# GPU machine (the same rows, fewer batches and rounds, so that every group fits its time budget).
SIZE = os.environ.get("RSLAD_FAST_BENCH_SIZE", "full")
if SIZE not in ("full", "reduced"):
    raise ValueError(f"RSLAD_FAST_BENCH_SIZE must be 'full' or 'reduced', got {SIZE!r}")
REDUCED = SIZE == "reduced"
# RSLAD_FAST_BENCH_ROUNDS=N: more timed rounds for the epoch rows, where one round is a few noisy seconds.
ROUNDS = int(os.environ.get("RSLAD_FAST_BENCH_ROUNDS", "0")) or None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_s(benchmark):
    """The measured median in seconds, or None when timing is off (--benchmark-disable runs each once)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


def run_synced(benchmark, fn, device, rounds=None, warmup=2):
    """Time fn with a device synchronisation inside the timed region."""

    def timed():
        fn()
        sync(device)

    for _ in range(warmup):
        timed()
    if rounds is None:
        return benchmark(timed)
    return benchmark.pedantic(timed, rounds=rounds, iterations=1)


RESULTS_DIR = os.environ.get("RSLAD_FAST_BENCH_OUT")


def save_result(name: str, payload: dict) -> None:
    """Write a JSON result (with device and versions) when RSLAD_FAST_BENCH_OUT names a folder."""
    if not RESULTS_DIR:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = dict(
        payload,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        commit=git_commit(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
