"""The GPU check's logic that runs without a GPU (issue 23): scripts/gpu_check.sh's helpers, sourced with
GPU_CHECK_LIB=1 and run against fake `compute-sanitizer` and `tar` executables first on PATH (the kernel filter's
help-text parse, the sanitizer probe and its fallback to the plain sweep, the budget, the archive's rename), the
script's start-up (one Python process before the first stage), gpu_summary.py's atomic writes, plan and
per-file benchmark JSON, and gpu_probes.py's warmed big-pgd timing."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_summary  # noqa: E402

# The old line: under pipefail, `grep -q` exits at the first match and the writer dies of SIGPIPE.
OLD_FILTER_LINE = 'compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && SAN+=(--kernel-name kns=rslad_fast)'


def _fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _path_without(tool: str, extra=()) -> str:
    """PATH with `extra` first and without any folder that holds `tool` (a real compute-sanitizer here)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / tool).exists()]
    return os.pathsep.join([*map(str, extra), *dirs])


def _helpers(snippet: str, tmp_path: Path, bin_dir: Path | None = None, **env) -> subprocess.CompletedProcess:
    """Run `snippet` in bash after sourcing the script's helpers (GPU_CHECK_LIB=1: nothing runs but the
    definitions), with WORK and OUT in tmp_path and fake executables in `bin_dir` first on PATH."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        "GPU_CHECK_LIB": "1",
        "WORK": str(work),
        "OUT": str(out),
        "PY": sys.executable,
        "PATH": _path_without("compute-sanitizer", [bin_dir] if bin_dir else []),
        **env,
    }
    prelude = f'source "{SCRIPT}" || exit 99; START=$(date +%s); cd "{ROOT}"\n'
    return subprocess.run(["bash", "-c", prelude + snippet], env=full_env, capture_output=True, text=True, timeout=120)


# A compute-sanitizer whose help names the filter early, then goes on for far more than a pipe's buffer, one
# write a line (as the real one, line-buffered, can): grep -q's early exit then always reaches the writer.
LONG_HELP = 'if [ "$1" = --help ]; then echo "Usage: compute-sanitizer [options]"; echo "  --kernel-name arg"\n' + (
    '  for i in $(seq 20000); do echo "  --option-$i  some description of an option"; done; exit 0; fi'
)


def test_kernel_filter_is_read_from_the_whole_help(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", LONG_HELP)
    # The fake reproduces the bug: the old pipeline fails, the filter silently drops.
    old = _helpers(f'SAN=(compute-sanitizer); {OLD_FILTER_LINE}; echo "SAN=${{SAN[*]}}"', tmp_path, bin_dir)
    assert "--kernel-name" not in old.stdout, old.stdout
    new = _helpers('SAN=(compute-sanitizer); sanitizer_kernel_filter; echo "SAN=${SAN[*]}"', tmp_path, bin_dir)
    assert new.returncode == 0, new.stderr
    assert new.stdout.strip() == "SAN=compute-sanitizer --kernel-name kns=rslad_fast"


def test_kernel_filter_absent_from_help_or_help_failing(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", 'echo "Usage: compute-sanitizer [options]"; echo "  --tool arg"; exit 0')
    r = _helpers('SAN=(compute-sanitizer); sanitizer_kernel_filter; echo "SAN=${SAN[*]}"', tmp_path, bin_dir)
    assert r.stdout.strip() == "SAN=compute-sanitizer"
    # A help that exits non-zero but names the option still counts (the exit status is not the question).
    _fake(bin_dir, "compute-sanitizer", 'echo "  --kernel-name arg"; exit 3')
    r = _helpers('SAN=(compute-sanitizer); sanitizer_kernel_filter; echo "SAN=${SAN[*]}"', tmp_path, bin_dir)
    assert r.stdout.strip() == "SAN=compute-sanitizer --kernel-name kns=rslad_fast"


# A sanitizer that runs its program: skips its own options (each takes a value), then runs the rest.
PASS_THROUGH = (
    'while [ $# -gt 0 ]; do case $1 in --help) echo "  --kernel-name arg"; exit 0 ;; --*) shift 2 ;; '
    '*) break ;; esac; done; echo "sanitized: $*" >>"$WORK/sanitized"; exec "$@"'
)
NOT_SUPPORTED = (
    'case $1 in --help) echo "  --kernel-name arg"; exit 0 ;; esac\n'
    'echo "========= Error: Device not supported"; echo "========= Program hit error 999 on CUDA API call"; exit 1'
)


def _program(program):  # the probe's Python program, set after the script's own
    return f"SAN_PROBE_PROGRAM={shlex.quote(program)}\n" if program else ""


def _probe(tmp_path, bin_dir, timeout_s=30, program=None):
    return _helpers(
        _program(program) + "SAN=(compute-sanitizer --error-exitcode 1); "
        f'reason=$(sanitizer_probe "$WORK/probe.log" {timeout_s}); echo "rc=$?"; echo "reason=$reason"',
        tmp_path,
        bin_dir,
    )


def test_sanitizer_probe_device_not_supported(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", NOT_SUPPORTED)
    r = _probe(tmp_path, bin_dir)
    assert "rc=1" in r.stdout
    assert 'cannot run on this machine: "Device not supported"' in r.stdout


def test_sanitizer_probe_runs_the_program_and_reports_its_failure(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", PASS_THROUGH)
    ok = _probe(tmp_path, bin_dir, program="print('one allocation')")
    assert ok.stdout.splitlines() == ["rc=0", "reason="], ok.stdout + ok.stderr
    assert "--tool" not in (tmp_path / "work" / "sanitized").read_text()  # the fake ran the program itself
    bad = _probe(tmp_path, bin_dir, program="raise SystemExit('CUDA error: no device')")
    assert "rc=1" in bad.stdout
    assert "probe failed (rc 1): CUDA error: no device" in bad.stdout


def test_sanitizer_probe_that_hangs_is_stopped(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", "case $1 in --help) exit 0 ;; esac; sleep 30")
    r = _probe(tmp_path, bin_dir, timeout_s=1)
    assert "rc=1" in r.stdout and "did not finish in 1s" in r.stdout


# The plan's memcheck and racecheck stages on a GPU machine, with `stage` and `finalize` stubbed: which stages
# would run, with what command, and what is recorded.
PLAN_SNIPPET = """
GPU=1; DEADLINE=$(( $(date +%s) + 500 ))
stage() { echo "STAGE $*" >>"$WORK/calls"; }
finalize() { :; }
start_sanitizer_probe
run_planned memcheck; run_planned racecheck
"""


def _plan_run(tmp_path, bin_dir=None, program=None):
    """PLAN_SNIPPET's stage calls (the commands that would run) and stages.tsv's rows."""
    r = _helpers(_program(program) + PLAN_SNIPPET, tmp_path, bin_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "work"
    calls = (work / "calls").read_text().splitlines() if (work / "calls").exists() else []
    tsv = (work / "stages.tsv").read_text() if (work / "stages.tsv").exists() else ""
    rows = [line.split("\t") for line in tsv.splitlines()]
    return calls, rows


def test_unusable_sanitizer_falls_back_to_the_plain_sweep(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", NOT_SUPPORTED)
    calls, rows = _plan_run(tmp_path, bin_dir)
    assert [c.split()[:2] for c in calls] == [["STAGE", "sweep"]]
    assert [(row[0], row[1]) for row in rows] == [("memcheck", "not run"), ("racecheck", "not run")]
    assert all("Device not supported" in row[4] for row in rows)
    assert "the plain sweep instead" in rows[0][4]


def test_no_sanitizer_on_path_falls_back_too(tmp_path):
    calls, rows = _plan_run(tmp_path)
    assert [c.split()[:2] for c in calls] == [["STAGE", "sweep"]]
    assert [(row[0], row[1]) for row in rows] == [("memcheck", "not run"), ("racecheck", "not run")]
    assert all("no compute-sanitizer on PATH" in row[4] for row in rows)


def test_working_sanitizer_runs_both_stages_filtered(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "compute-sanitizer", PASS_THROUGH)
    calls, rows = _plan_run(tmp_path, bin_dir, program="print('one allocation')")
    assert [c.split()[1] for c in calls] == ["memcheck", "racecheck"]
    assert all("--kernel-name kns=rslad_fast" in c for c in calls)
    assert "--tool memcheck" in calls[0] and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in calls[0]
    assert "--tool racecheck" in calls[1]
    assert rows == []  # nothing recorded "not run"


def test_stage_runs_what_fits_and_records_what_does_not(tmp_path):
    r = _helpers(
        "finalize() { :; }; FAILED=0; DEADLINE=$(( $(date +%s) + 40 ))\n"
        'stage backend true; stage graphs true; stage sweep false; echo "FAILED=$FAILED" >"$WORK/failed"',
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    work = tmp_path / "work"
    rows = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines()]
    assert (work / "failed").read_text() == "FAILED=1\n"
    assert (rows[0][0], rows[0][1]) == ("backend", "passed")
    assert (rows[1][0], rows[1][1]) == ("graphs", "not run")  # 45 s estimate, ~40 s left
    assert rows[1][4].endswith("s left, needs ~45s")
    assert (rows[2][0], rows[2][1], rows[2][4]) == ("sweep", "failed", "rc 1")


def test_archive_is_renamed_into_place_and_a_failed_write_keeps_the_last(tmp_path):
    work = tmp_path / "work"
    (work / "smoke").mkdir(parents=True)
    (work / "stages.tsv").write_text("backend\tpassed\t1\t10\trc 0\n")
    (work / "smoke" / "last.pt").write_bytes(b"x" * 1000)
    dest = tmp_path / "out" / "gpu_check_logs.tar.gz"
    r = _helpers(f'archive_logs "$WORK" "{dest}"; echo "rc=$?"', tmp_path)
    assert "rc=0" in r.stdout, r.stderr
    with tarfile.open(dest) as t:
        names = t.getnames()
    assert "./stages.tsv" in names and not any(n.endswith(".pt") for n in names)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["gpu_check_logs.tar.gz"]  # no temporary left
    good = dest.read_bytes()
    # A tar that dies mid-write (as a kill would leave it): the temporary goes, the last archive stays whole.
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "tar", 'printf "partial" >"$2"; exit 2')
    r = _helpers(f'archive_logs "$WORK" "{dest}"; echo "rc=$?"', tmp_path, bin_dir)
    assert "rc=1" in r.stdout
    assert dest.read_bytes() == good
    assert sorted(p.name for p in dest.parent.iterdir()) == ["gpu_check_logs.tar.gz"]


def test_write_atomic_keeps_the_last_whole_file(tmp_path, monkeypatch):
    md = tmp_path / "summary.md"
    gpu_summary.write_atomic(md, "first\n")
    assert md.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]

    def killed(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(gpu_summary.os, "replace", killed)
    with pytest.raises(OSError):
        gpu_summary.write_atomic(md, "second, never whole\n")
    assert md.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


def _bench_json(*rows):
    return {
        "datetime": "2026-01-01",
        "benchmarks": [
            {
                "name": name,
                "group": group,
                "stats": {"median": median, "iqr": 0.0, "rounds": 2},
                "extra_info": {"impl": impl, "device": "cuda", "torch": "x", "commit": "c"},
            }
            for name, group, impl, median in rows
        ],
    }


def test_summary_plan_projection_not_reached_and_one_json_a_file(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "machine.txt").write_text("gpu: H100\ncores: 16\ndeadline_s: 520\nstartup_s: 15\n")
    (work / "plan.tsv").write_text("build\t100\nbench_full_epoch\t300\nbench_full_ops\t200\nquick_fp32\t120\n")
    (work / "stages.tsv").write_text(
        "build\tpassed\t90\t100\trc 0\nbench_full_epoch\ttimed out\t600\t300\trc 124\n"
        "bench_full_ops\tnot run\t0\t200\t5s left | needs ~200s\n"
    )
    # The epoch stage was killed: no JSON. The ops stage's JSON and its compiled rows' JSON come back.
    (work / "bench_full_ops.json").write_text(json.dumps(_bench_json(("t_eager", "kl", "eager", 2.0))))
    (work / "bench_full_ops_compiled.json").write_text(json.dumps(_bench_json(("t_comp", "kl", "compiled", 1.0))))
    (work / "bench_full_inner.json").write_text(json.dumps(_bench_json(("t_inner", "inner", "eager", 1.0))))
    md = tmp_path / "summary.md"
    assert gpu_summary.main([str(work), "--md", str(md), "--json", str(work / "summary.json")]) == 0
    text = md.read_text()
    assert "| quick_fp32 | not reached |" in text
    assert "5s left \\| needs ~200s" in text  # a note cannot break the table
    assert "- not run: bench_full_ops (5s left | needs ~200s)" in text
    assert "these would fit: build, bench_full_epoch; and these would not: bench_full_ops, quick_fp32" in text
    assert "## Benchmarks: bench_full_ops" in text and "## Benchmarks: bench_full_inner" in text
    ops = text.split("## Benchmarks: bench_full_ops")[1]
    assert "| compiled | 1000.000 ms | 2.00x |" in ops  # joined its group, against eager
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_plan_projection():
    plan = [("a", 100), ("b", 300), ("c", 200), ("d", 50)]
    assert gpu_summary.plan_projection(plan, 15, 520) == (["a", "b", "d"], ["c"])


def test_big_pgd_is_timed_after_a_warm_up_and_checked_once():
    import gpu_probes

    r = gpu_probes.big_pgd("cpu", 100_003, 30_000, repeats=2)
    # The warm-up's step is undone before the timed calls: a second step on top would not match the reference.
    assert r["mismatched"] == 0 and r["first_mismatch"] is None
    assert r["repeats"] == 2 and r["first_call_s"] > 0 and r["seconds"] > 0


def test_one_python_start_up_before_the_first_stage(tmp_path):
    """The whole script in the dry run with a plan of two stages that need no Python: every Python process is
    the one start-up probe or the summary's."""
    calls = tmp_path / "python_calls"
    wrapper = tmp_path / "bin" / "python"
    _fake(wrapper.parent, "python", f'echo "$*" >>"{calls}"; exec "{sys.executable}" "$@"')
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_CHECK_ALLOW_CPU": "1",
        "GPU_CHECK_STAGES": "build racecheck",
        "GPU_CHECK_COMMIT": "test",
        "OUT": str(out),
        "PYTHON": str(wrapper),
        "TMPDIR": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("GPU_CHECK_LIB", None)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = calls.read_text().splitlines()
    assert [line for line in lines if "gpu_summary.py" not in line] == ["-"]  # the start-up probe, from stdin
    text = (out / "summary.md").read_text()
    assert "| build | not run | 0 | 0 | dry run: the build that is here |" in text
    assert "| racecheck | not run | 0 | 0 | dry run: no sanitizer on the CPU |" in text
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_logs.tar.gz", "summary.md"]


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    env = {**os.environ, "GPU_CHECK_STAGES": "build nope", "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown stage in GPU_CHECK_STAGES: nope" in r.stderr


def test_smoke_trains_every_method_and_adaad_through_the_fp16_teacher():
    """gpu_smoke.py's plan: every registered method in fp32 and bf16, RSLAD's graph pair, and the CIFAR-100
    runs with the fp16 teacher: RSLAD's and AdaAD's (whose attack differentiates through that teacher)."""
    import gpu_smoke

    from rslad_fast import methods

    cases = gpu_smoke.training_cases()
    assert len(cases) == len(set(cases))
    for method in methods.names():
        assert {(method, amp, True, "cifar10") for amp in ("fp32", "bf16")} <= set(cases)
    assert {("rslad", amp, False, "cifar10") for amp in ("fp32", "bf16")} <= set(cases)
    c100 = [c for c in cases if c[3] == "cifar100"]
    assert c100 == [(m, amp, True, "cifar100") for m in ("rslad", "adaad") for amp in ("fp32", "bf16")]
