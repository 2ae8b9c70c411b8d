#!/usr/bin/env bash
# The GPU check: one run of at most 9 minutes on a bare GPU machine (the device tool's README: it gives a
# session 15 minutes in all, machine start included, and a machine rarely stays warm for a second call).
#
#   here, once:    bash scripts/gpu_wheels.sh      # .whl/site: torchattacks and pyautoattack, unpacked, nothing else
#   device tool:   run(command="GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   optional second run, also on a bare machine: GPU_CHECK_MODE=full (the benchmarks at full size, then the
#                  quick preset in fp32 and bf16 on CIFAR-10), carry ["shared_data"] after
#                  `mkdir -p shared_data && cp ../shared/data/* shared_data/` here
#   CPU dry run:   GPU_CHECK_ALLOW_CPU=1 bash scripts/gpu_check.sh   (CI runs it: the script's whole logic at tiny
#                  sizes on the build CI already made, a few minutes)
#
# The machine's image has Python 3.12, torch 2.11.0+cu130, torchvision, numpy, scipy, pytest, pytest-benchmark,
# tqdm, matplotlib, ninja, setuptools, nvcc, compute-sanitizer and ncu; no DALI (its loader rows are skipped).
#
# Stages, in this order (what matters first). Each has an estimate of its time on that machine (16 cores,
# one H200), from its work, and runs only if the estimate still fits in what is left of GPU_CHECK_BUDGET_S
# (default 540 s, less 20 s kept for the last summary); it is stopped at twice its estimate (or the deadline)
# and then marked "timed out". The estimates of the stages before the compiled rows add up to ~525 s: the
# last benchmark stages run only if the earlier ones are quicker than estimated.
#   stage           est. s  work
#   build              75   in-place build for this GPU's architecture only (+PTX), all cores: 3 C++ files (the
#                           CPU softmax_kl kernels, AVX2 and baseline copies, are the slowest, ~60 s on one core
#                           of the CPU machine) and 2 .cu files for one architecture (~10 s each with nvcc 13.0,
#                           measured on the CPU machine); the backend must then be "compiled" with CUDA kernels
#   backend            10   import check (RSLAD_FAST_REQUIRE=cuda)
#   tests_cuda         40   every cuda-marked test but the graph ones (~600 op cases of a few ms each, float64
#                           included, autocast, DALI skipped) and the build's PTX check; torch start-up ~15 s
#   memcheck           60   compute-sanitizer memcheck over scripts/gpu_probes.py sweep: every op, dtype and
#   racecheck          30   reduction at odd sizes (~160 cases), only our kernels instrumented where the tool can
#                           filter; 10-50x slower kernels and a slower CUDA start under the sanitizer
#   big_pgd            20   pgd_step_ on 2^31 + 4099 fp16 elements (4 x 4.3 GB), checked in 17 chunks
#   graphs             45   replay == eager (contiguous, channels_last, caller's autocast, across optimizer
#                           steps, load_state_dict and replaced parameters, a thread using CUDA during capture):
#                           ~12 captures of tiny / MobileNetV2 loops
#   smoke             110   scripts/gpu_smoke.py: 7 methods x fp32/bf16 + RSLAD graph off + RSLAD on CIFAR-100
#                           with an fp16 teacher (fp32/bf16), each one epoch of 4 batches of 128 (MobileNetV2)
#                           and a 128-image PGD-20, ~3 s each; evaluate with all six
#                           attacks on 128 images ~20 s; torchrun (NCCL) ~25 s
#   bench_ops          30   the op rows (fused, eager) on CUDA: 24 rows of ~1 s
#   bench_inner        40   the 10-step inner loop, eager / fused / fused + graph, batch 128 and 512, 5 rounds
#   bench_epoch        75   the epoch rows, 4 batches x 2 rounds with the WRN-34-10 teacher (~20 rows of ~3 s:
#                           throughput, ablation, the teacher cache at 0% / 60.5% / 54.4% hits), and the
#                           loaders (10,240 images)
#   bench_*_compiled  60+90 the torch.compile rows, only with what time is left (inductor compiles each shape)
# Full mode: bench_full (the benchmarks at full size, 400 s) then quick_fp32 / quick_bf16 (the quick preset on
# CIFAR-10, ~90 s each on that machine) and their comparison.
#
# Every stage runs with RSLAD_FAST_REQUIRE=cuda (compiled in the dry run): importing rslad_fast fails
# rather than fall back to the reference ops. Output: $OUT/summary.md (what passed, failed, timed out or was
# skipped, every figure, with device, torch version and commit) and $OUT/gpu_check_logs.tar.gz (every log and
# JSON), both rewritten after each stage so that even a killed run returns what it did.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
MODE=${GPU_CHECK_MODE:-quick}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + BUDGET - 20))  # 20 s kept for the last summary and archive
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT"
: >"$WORK/stages.tsv"
case $MODE in quick|full) ;; *) echo "GPU_CHECK_MODE must be quick or full, got $MODE" >&2; exit 2 ;; esac

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$WORK/gpu_check.log"; }

finalize() {  # summary + archive; after every stage, so a killed run still returns what it did
  "$PY" scripts/gpu_summary.py "$WORK" --md "$OUT/summary.md" --json "$WORK/summary.json" >/dev/null 2>>"$WORK/gpu_check.log"
  # Logs and JSON only: the smoke's checkpoints (MobileNetV2 runs, ~60 MB) and data would make the archive slow
  # to write after every stage, and too big to come back.
  tar -czf "$OUT/gpu_check_logs.tar.gz" --exclude='*.pt' --exclude='./smoke/data' --exclude='./smoke/data100' -C "$WORK" . 2>/dev/null
}

stage() {  # stage NAME ESTIMATE_S COMMAND...: run it if it fits, stop it at 2 x ESTIMATE_S or the deadline
  local name=$1 est=$2; shift 2
  local now left cap t0 rc status
  now=$(date +%s); left=$((DEADLINE - now))
  if [ "$left" -lt "$est" ]; then
    log "-- $name skipped: ${left}s left, needs ~${est}s"
    printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$est" "${left}s left" >>"$WORK/stages.tsv"
    finalize; return 0
  fi
  cap=$((2 * est)); [ "$cap" -gt "$left" ] && cap=$left
  log "== $name (estimate ${est}s, stopped after ${cap}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=passed ;; 124|137) status="timed out" ;; *) status=failed ;; esac
  [ "$status" = passed ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$est" "rc $rc" >>"$WORK/stages.tsv"
  log "   $name $status in $(( $(date +%s) - t0 ))s (rc $rc)"
  tail -n 15 "$WORK/$name.log"
  # torchrun starts its workers in sessions of their own, out of timeout's reach: none may outlive its stage
  pkill -f "rslad_fast[.]train.*$WORK" 2>/dev/null && sleep 1  # this run's (their --out is under $WORK)
  finalize
}
FAILED=0

# ---- what machine this is -----------------------------------------------------------------------------------
GPU=0
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && GPU=1
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (set GPU_CHECK_COMMIT)")}
{ echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "commit: $COMMIT"; echo "mode: $MODE"
  echo "dry_run: $([ $GPU = 1 ] && echo no || echo yes)"
  "$PY" -c "import sys, torch; print('python:', sys.version.split()[0]); print('torch:', torch.__version__, \
'cuda', torch.version.cuda); print('gpu:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  echo "cores: $(nproc)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; } \
  >"$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt"
if [ $GPU = 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  log "no CUDA GPU visible: stopping (GPU_CHECK_ALLOW_CPU=1 dry-runs the logic on the CPU)"; finalize; exit 2
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export RSLAD_FAST_BENCH_OUT=$WORK/bench_results
[ -d .whl/site ] && export PYTHONPATH=$PYTHONPATH:$ROOT/.whl/site  # torchattacks, pyautoattack (gpu_wheels.sh)

# ---- 1. build -------------------------------------------------------------------------------------------------
if [ $GPU = 1 ]; then
  # The toolkit: /usr/local/cuda when it has nvcc (a wrapper nvcc elsewhere can mislead torch), else nvcc's own.
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
  fi
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH=$CUDA_HOME/bin:$PATH
  # This GPU's architecture only (+PTX, so the build test's PTX check holds for it too).
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  stage build 75 env TORCH_CUDA_ARCH_LIST="$ARCH+PTX" MAX_JOBS="$(nproc)" RSLAD_FAST_CUDA=1 \
    "$PY" setup.py build_ext --inplace
  export RSLAD_FAST_REQUIRE=cuda
else
  log "-- build skipped: dry run, using the build that is here"
  printf 'build\tskipped\t0\t75\tdry run: the existing build\n' >>"$WORK/stages.tsv"
  export RSLAD_FAST_REQUIRE=compiled
fi
stage backend 10 "$PY" -c "import rslad_fast as r; print('ops backend', r.ops.backend(), '| CUDA kernels', \
r.ops.cuda_kernels_available())"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
if [ "$MODE" = quick ]; then
  # ---- 2. the CUDA tests ------------------------------------------------------------------------------------
  # Every cuda-marked test but the graph ones (stage 4), and the PTX check of this build; the register check
  # of test_cuda_build.py compiles for the default architectures on the CPU and runs in CI.
  stage tests_cuda 40 "${PYTEST[@]}" tests -m "cuda or ptx" --ignore=tests/test_graphed.py \
    --ignore=tests/test_fast_path.py --junitxml="$WORK/tests_cuda.xml"

  # ---- 3. sanitizers, then pgd_step_ past 2^31 elements -------------------------------------------------------
  if [ $GPU = 1 ]; then
    if command -v compute-sanitizer >/dev/null; then
      # --report-api-errors no: CUDA API errors torch provokes and handles itself are not our kernels' errors.
      # Only our kernels are instrumented where the tool can filter (torch's own kernels would cost the time).
      SAN=(compute-sanitizer --error-exitcode 1 --print-limit 20 --report-api-errors no)
      compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && SAN+=(--kernel-name kns=rslad_fast)
      # No caching allocator under memcheck: an overrun inside a pooled block would be invisible.
      stage memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool memcheck \
        "$PY" scripts/gpu_probes.py sweep --json "$WORK/memcheck.json"
      stage racecheck 30 "${SAN[@]}" --tool racecheck "$PY" scripts/gpu_probes.py sweep --json "$WORK/racecheck.json"
    else
      log "-- memcheck / racecheck skipped: no compute-sanitizer on PATH or in $CUDA_HOME/bin"
      printf 'memcheck\tskipped\t0\t60\tno compute-sanitizer\nracecheck\tskipped\t0\t30\tno compute-sanitizer\n' \
        >>"$WORK/stages.tsv"
      stage sweep 30 "$PY" scripts/gpu_probes.py sweep --json "$WORK/sweep.json"
    fi
    stage big_pgd 20 "$PY" scripts/gpu_probes.py big-pgd --json "$WORK/big_pgd.json"
  else  # the dry run: the same probes, without the sanitizer, at CPU sizes
    stage sweep 30 "$PY" scripts/gpu_probes.py sweep --large-rows 70000 --json "$WORK/sweep.json"
    stage big_pgd 20 "$PY" scripts/gpu_probes.py big-pgd --numel $((4 * 1024 * 1024 + 3)) --chunk 1000003 \
      --json "$WORK/big_pgd.json"
  fi

  # ---- 4. CUDA-graph probes ----------------------------------------------------------------------------------
  stage graphs 45 "${PYTEST[@]}" -m cuda tests/test_graphed.py tests/test_fast_path.py --junitxml="$WORK/graphs.xml"

  # ---- 5. training smoke: every method, fp32 and bf16, graph on and off, then torchrun -------------------------
  if [ $GPU = 1 ]; then
    stage smoke 110 "$PY" scripts/gpu_smoke.py --out "$WORK/smoke"
  else
    stage smoke 90 "$PY" scripts/gpu_smoke.py --out "$WORK/smoke" --tiny
  fi

  # ---- 6. benchmarks at reduced size (CUDA rows; compiled rows last, with what is left) -------------------------
  if [ $GPU = 1 ]; then
    BENCH=(env RSLAD_FAST_BENCH_SIZE=reduced "$PY" -m pytest -q -p no:cacheprovider --benchmark-only
           --benchmark-max-time=0.25 --benchmark-columns=median,iqr,rounds)
    # One stage a file, each with its own JSON: pytest-benchmark writes it at the end of a session only.
    stage bench_ops 30 "${BENCH[@]}" benchmarks/test_ops_bench.py -k "cuda and not compiled" \
      --benchmark-json="$WORK/bench_ops.json"
    stage bench_inner 40 "${BENCH[@]}" benchmarks/test_inner_loop_bench.py -k cuda \
      --benchmark-json="$WORK/bench_inner.json"
    stage bench_epoch 75 "${BENCH[@]}" benchmarks/test_epoch_bench.py benchmarks/test_loaders_bench.py \
      -k "cuda and not compile" --benchmark-json="$WORK/bench_epoch.json"
    # With what is left: the torch.compile rows, the cheap op rows first (inductor compiles each shape).
    stage bench_ops_compiled 60 "${BENCH[@]}" benchmarks/test_ops_bench.py -k "cuda and compiled" \
      --benchmark-json="$WORK/bench_ops_compiled.json"
    stage bench_epoch_compiled 90 "${BENCH[@]}" benchmarks/test_epoch_bench.py -k "cuda and compile" \
      --benchmark-json="$WORK/bench_epoch_compiled.json"
  else  # dry run: the same plumbing, a few CPU rows, timed (a JSON to summarise)
    stage bench_ops 60 "$PY" -m pytest benchmarks/test_ops_bench.py -q -p no:cacheprovider --benchmark-only \
      --benchmark-max-time=0.05 -k "cpu and not compiled and not backward" \
      --benchmark-json="$WORK/bench_ops.json"
  fi
else
  # ---- full mode: the benchmarks at full size, then the quick preset fp32 vs bf16 on CIFAR-10 -----------------
  stage bench_full 400 "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
    $([ $GPU = 1 ] && echo "-k cuda") --benchmark-columns=median,iqr,rounds --benchmark-json="$WORK/bench_full.json"
  data=${DATA:-data}
  for src in shared_data ../shared/data; do
    if [ ! -d "$data/cifar-10-batches-py" ] && [ -f "$src/prepare_cifar10.py" ]; then
      stage prepare 40 "$PY" "$src/prepare_cifar10.py" "$data"
    fi
  done
  if [ -d "$data/cifar-10-batches-py" ]; then
    for amp in fp32 bf16; do
      stage "quick_$amp" 120 "$PY" -m rslad_fast.train --preset quick --student mnv2 --data "$data" \
        --out "$WORK/quick_$amp" --amp "$amp" --overwrite --no-progress
    done
    stage quick_compare 10 "$PY" scripts/compare_runs.py "$WORK/quick_fp32" "$WORK/quick_bf16" \
      --md "$WORK/quick_compare.md"
  else
    log "no CIFAR-10 here (carry shared_data): the fp32-vs-bf16 accuracy comparison is skipped"
  fi
fi

log "done in $(( $(date +%s) - START ))s; $([ $FAILED = 0 ] && echo 'every stage that ran passed' || echo 'some stages failed')"
finalize
cat "$OUT/summary.md"
exit $FAILED
