#!/usr/bin/env bash
# The GPU check: one run of at most 9 minutes on a bare GPU machine (the device tool's README: it gives a
# session 15 minutes in all, machine start included, and a machine rarely stays warm for a second call).
#
#   here, once:    bash scripts/gpu_wheels.sh      # .whl/site: torchattacks and pyautoattack, unpacked, nothing else
#   device tool:   run(command="GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   optional second run, also on a bare machine: GPU_CHECK_MODE=full (the benchmarks at full size, one stage and
#                  one JSON a file), carry ["shared_data"] after
#                  `mkdir -p shared_data && cp ../shared/data/* shared_data/` here for the quick-preset stages
#   CPU dry run:   GPU_CHECK_ALLOW_CPU=1 bash scripts/gpu_check.sh   (CI runs it: the script's whole logic at tiny
#                  sizes on the build CI already made, a few minutes)
#   GPU_CHECK_STAGES="build backend prepare quick_fp32 quick_bf16 quick_compare": these stages, in this order,
#                  instead of the mode's plan (here: full mode's fp32-vs-bf16 accuracy comparison on CIFAR-10, which
#                  does not fit in one call after the full-size benchmarks)
#
# The machine's image has Python 3.12, torch 2.11.0+cu130, torchvision, numpy, scipy, pytest, pytest-benchmark,
# tqdm, matplotlib, ninja, setuptools, nvcc, compute-sanitizer and ncu; no DALI (its loader rows are skipped).
#
# The stages run in the order of the plan (PLAN below): what matters most first, the tests, then the headline
# benchmarks. Each has an estimate (EST below) of its time on that machine (16 cores, one H100/H200), and runs
# only if the estimate still fits in what is left of GPU_CHECK_BUDGET_S (default 540 s, less 20 s kept for the
# last summary); it is stopped at twice its estimate (or the deadline) and then marked "timed out". A stage that
# does not run is recorded "not run: <reason>" (no time left, no usable sanitizer, dry run), and the summary
# lists the plan: which stages fit if each takes its estimate, and any the run did not reach.
#   stage           est. s  work
#   (start-up)        ~15   one Python process (torch import, CUDA start): device, torch, GPU architecture
#   build             100   in-place build for this GPU's architecture only (+PTX), all cores, one file a core:
#                           bounded by the slowest file. Measured once on the CPU machine (AMD EPYC, 2 cores shared
#                           with other jobs, load 2-5; MAX_JOBS=1, sm_90+PTX, -O3, torch 2.14 headers), wall time
#                           per file: cuda/pgd_step_kernel.cu 68 s, cuda/softmax_kl_kernel.cu 57 s,
#                           cpu/softmax_kl_kernel.cpp 67 s, cpu/pgd_step_kernel.cpp 65 s, autocast 40 s, ops.cpp 11 s
#                           (the whole build 313 s wall, 186 s of CPU: ~60% of each on a core of its own); issue 23
#                           saw 40 s and ~80 s of CPU for the two .cu files. Slowest file ~70-80 s + ~10 s of
#                           setup.py, ninja and the link. The backend must then be "compiled" with CUDA kernels
#   backend            10   import check (RSLAD_FAST_REQUIRE=cuda)
#   tests_cuda         40   every cuda-marked test but the graph ones (~600 op cases of a few ms each, float64
#                           included, autocast, DALI skipped) and the build's PTX check; torch start-up ~15 s
#   graphs             45   replay == eager (contiguous, channels_last, caller's autocast, across optimizer
#                           steps, load_state_dict and replaced parameters, a thread using CUDA during capture):
#                           ~12 captures of tiny / MobileNetV2 loops
#   bench_headline    110   issue 20's headline: one RSLAD step at batch 128 with the WRN-34-10 teacher, the
#                           official step against ours and the ablation (channels_last, folded BatchNorm, bf16
#                           student and teacher, the teacher cache), both students: 18 rows of 1 warm-up + 2
#                           steps, ~5 s a row with the WRN-34-10's build, fold and cuDNN autotuning; and AdaAD's
#                           step (the teacher's forward and backward in each of the 10 attack steps), official /
#                           ours fp32 / ours defaults, ResNet-18 only: 3 rows of ~6 s (not yet measured)
#   bench_epoch        75   the epoch rows, 4 batches x 2 rounds with the WRN-34-10 teacher (~20
#                           rows of ~3 s: throughput, ablation, the teacher cache at 0% / 60.5% / 54.4% hits),
#                           and the loaders (10,240 images)
#   bench_inner        40   the 10-step inner loop, eager / fused / fused + graph, batch 128 and 512, 5 rounds
#   memcheck           60   compute-sanitizer memcheck over scripts/gpu_probes.py sweep: every op, dtype and
#                           reduction at odd sizes (~160 cases), only our kernels instrumented where the tool can
#                           filter; 10-50x slower kernels and a slower CUDA start under the sanitizer. A
#                           one-allocation probe under the sanitizer runs during the build: where the tool cannot
#                           run on the machine ("Device not supported" on some container runtimes) the plain
#   (sweep)            30   sweep runs here instead, and memcheck and racecheck are "not run: <why>"
#   big_pgd            20   pgd_step_ on 2^31 + 4099 fp16 elements (4 x 4.3 GB), checked in 17 chunks; its GB/s
#                           the best of 3 calls after a warm-up call (module load, first launch)
#   smoke             130   scripts/gpu_smoke.py: every registered method x fp32/bf16 + RSLAD graph off + RSLAD and
#                           AdaAD on CIFAR-100 with an fp16 teacher (fp32/bf16; AdaAD's attack differentiates
#                           through the fp16 teacher), each one epoch of 4 batches of 128 (MobileNetV2)
#                           and a 128-image PGD-20, ~3 s each; evaluate with all six
#                           attacks on 128 images ~20 s; torchrun (NCCL) ~25 s
#   racecheck          30   compute-sanitizer racecheck over the same sweep
#   bench_ops          30   the op rows (fused, eager) on CUDA: 24 rows of ~1 s
#   bench_*_compiled  60+90 the torch.compile rows (inductor's default mode), only with what time is left
# With every estimate met, the stages through smoke fit (~515 s of 520); bench_epoch, bench_inner, racecheck and
# the rest run with what the earlier stages leave. Where the sanitizer cannot run, the sweep takes 30 s less than memcheck, racecheck
# is "not run" and bench_ops fits.
# Full mode: the benchmarks at full size, one stage and one JSON a file (pytest-benchmark writes its JSON only
# at the end of a session, so a stage stopped at its cap loses its own figures only), without torch.compile:
# bench_full_headline 180 (AdaAD's 6 rows included) first, then bench_full_epoch 150, bench_full_inner 60, bench_full_ops 40,
# bench_full_loaders 30 (~585 s with the build: the last of them run only if the earlier beat their estimates);
# then, only with what is left, the quick preset on CIFAR-10 (prepare 40, quick_fp32 / quick_bf16 120 each,
# quick_compare 10) and the compiled rows (ops 90; the epoch's, torch.compile max-autotune at full size, 240:
# minutes of autotuning). Neither fits after the benchmarks: name them in GPU_CHECK_STAGES for a call of their own.
#
# Every stage runs with RSLAD_FAST_REQUIRE=cuda (compiled in the dry run): importing rslad_fast fails
# rather than fall back to the reference ops. Output: $OUT/summary.md (what passed, failed, timed out or was
# not run and why, the plan, every figure, with device, torch version and commit) and $OUT/gpu_check_logs.tar.gz
# (every log and JSON), both rewritten after each stage so that even a killed run returns what it did; each is
# written under a temporary name in $OUT and renamed, so a kill during a rewrite leaves the last whole copy.
set -uo pipefail

# ---- the stages' estimates (s), see above --------------------------------------------------------------------
declare -A EST=(
  [build]=100 [backend]=10 [tests_cuda]=40 [graphs]=45 [bench_headline]=110 [bench_epoch]=75 [bench_inner]=40 [memcheck]=60
  [racecheck]=30 [sweep]=30 [big_pgd]=20 [smoke]=130 [bench_ops]=30 [bench_ops_compiled]=60
  [bench_epoch_compiled]=90
  [bench_full_headline]=180 [bench_full_epoch]=150 [bench_full_inner]=60 [bench_full_ops]=40 [bench_full_loaders]=30 [prepare]=40
  [quick_fp32]=120 [quick_bf16]=120 [quick_compare]=10 [bench_full_ops_compiled]=90 [bench_full_epoch_compiled]=240
)
PLAN_QUICK=(build backend tests_cuda graphs bench_headline memcheck big_pgd smoke bench_epoch bench_inner racecheck
            bench_ops bench_ops_compiled bench_epoch_compiled)
PLAN_FULL=(build backend bench_full_headline bench_full_epoch bench_full_inner bench_full_ops bench_full_loaders prepare quick_fp32
           quick_bf16 quick_compare bench_full_ops_compiled bench_full_epoch_compiled)

# ---- helpers (tests/test_gpu_check.py sources this file with GPU_CHECK_LIB=1 and calls them) -----------------
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$WORK/gpu_check.log"; }

one_line() { tr '\t\r\n' '   ' | cut -c1-240; }  # a note for stages.tsv: one line, no tabs

# The kernel filter: only our kernels instrumented (torch's own would cost the time and hit the caps). The help
# is read into a variable first: `compute-sanitizer --help | grep -q` fails under pipefail whenever grep's
# early exit gets the writer a SIGPIPE, and the filter would silently drop.
sanitizer_kernel_filter() {  # appends the filter to the array SAN when the tool has one
  local help
  help=$(compute-sanitizer --help 2>&1) || true
  case $help in
    *--kernel-name*) SAN+=(--kernel-name kns=rslad_fast) ;;
  esac
}

# sanitizer_probe LOG [TIMEOUT_S]: can "${SAN[@]}" run a CUDA program on this machine? One allocation and one
# kernel under memcheck, with the same options as the real stages. On some container runtimes the tool answers
# "Device not supported" and fails at the first allocation. Prints why not (nothing when it ran); status 1 then.
SAN_PROBE_PROGRAM='import torch; x = torch.ones(1, device="cuda"); torch.cuda.synchronize(); assert x.item() == 1'
sanitizer_probe() {
  local logf=$1 t=${2:-90} rc
  timeout --kill-after=5 "$t" "${SAN[@]}" --tool memcheck "$PY" -c "$SAN_PROBE_PROGRAM" >"$logf" 2>&1
  rc=$?
  [ "$rc" = 0 ] && return 0
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "compute-sanitizer's one-allocation probe did not finish in ${t}s"
  elif grep -q "Device not supported" "$logf"; then
    echo "compute-sanitizer cannot run on this machine: \"Device not supported\" at a one-allocation probe"
  else
    echo "compute-sanitizer's one-allocation probe failed (rc $rc):" \
      "$(grep -v '^[[:space:]]*$' "$logf" | tail -n 1 | one_line)"
  fi
  return 1
}

# start_sanitizer_probe: the probe in the background (during the build, which leaves cores and the GPU idle);
# its answer goes to $WORK/sanitizer_probe.reason (empty: the tool works), read by sanitizer_ready.
start_sanitizer_probe() {
  SAN=(compute-sanitizer --error-exitcode 1 --print-limit 20 --report-api-errors no)
  if ! command -v compute-sanitizer >/dev/null; then
    echo "no compute-sanitizer on PATH or in ${CUDA_HOME:-\$CUDA_HOME}/bin" >"$WORK/sanitizer_probe.reason"
    return 0
  fi
  sanitizer_kernel_filter
  ( sanitizer_probe "$WORK/sanitizer_probe.log" 90 >"$WORK/sanitizer_probe.reason" ) &
  SAN_PROBE_PID=$!
}

sanitizer_ready() {  # true when the probe ran; else SAN_REASON says why the sanitizer stages cannot
  if [ -z "${SAN_CHECKED:-}" ]; then
    SAN_CHECKED=1
    [ -n "${SAN_PROBE_PID:-}" ] && wait "$SAN_PROBE_PID"
    if [ -f "$WORK/sanitizer_probe.reason" ]; then
      SAN_REASON=$(one_line <"$WORK/sanitizer_probe.reason")
    else
      SAN_REASON="compute-sanitizer was not probed"
    fi
  fi
  [ -z "$SAN_REASON" ]
}

# archive_logs DIR DEST: DIR's logs and JSON as DEST (.tar.gz), written under a temporary name in DEST's folder
# and renamed (atomic): a kill mid-write leaves the last whole archive. Without the smoke's checkpoints
# (MobileNetV2 runs, ~60 MB) and data: slow to write after every stage, and too big to come back.
archive_logs() {
  local dest=$2 tmp rc
  tmp="$(dirname "$dest")/$(basename "$dest").tmp"
  tar -czf "$tmp" --exclude='*.pt' --exclude='./smoke/data' --exclude='./smoke/data100' -C "$1" . 2>/dev/null
  rc=$?
  if [ "$rc" -le 1 ]; then  # 1: a file changed while it was read; the archive is whole
    mv -f "$tmp" "$dest"
  else
    rm -f "$tmp"
    return 1
  fi
}

finalize() {  # summary + archive; after every stage, so a killed run still returns what it did
  # gpu_summary.py writes summary.md under a temporary name and renames it too
  "$PY" scripts/gpu_summary.py "$WORK" --md "$OUT/summary.md" --json "$WORK/summary.json" \
    >/dev/null 2>>"$WORK/gpu_check.log"
  archive_logs "$WORK" "$OUT/gpu_check_logs.tar.gz"
}

not_run() {  # not_run NAME REASON: record a stage that did not run, and why
  local reason
  reason=$(printf '%s' "$2" | one_line)
  log "-- $1 not run: $reason"
  printf '%s\tnot run\t0\t%s\t%s\n' "$1" "${EST[$1]:-0}" "$reason" >>"$WORK/stages.tsv"
  finalize
}

stage() {  # stage NAME COMMAND...: run it if EST[NAME] fits, stop it at 2 x EST[NAME] or the deadline
  local name=$1; shift
  local est=${EST[$name]} now left cap t0 rc status
  now=$(date +%s); left=$((DEADLINE - now))
  if [ "$left" -lt "$est" ]; then
    not_run "$name" "${left}s left, needs ~${est}s"
    return 0
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

run_sweep() {  # the plain op sweep (no sanitizer): at CPU sizes in the dry run
  if [ "$GPU" = 1 ]; then
    stage sweep "$PY" scripts/gpu_probes.py sweep --json "$WORK/sweep.json"
  else
    stage sweep "$PY" scripts/gpu_probes.py sweep --large-rows 70000 --json "$WORK/sweep.json"
  fi
}

cuda_only() {  # cuda_only NAME COMMAND...: the stage on a GPU; "not run" in the dry run
  if [ "$GPU" = 1 ]; then stage "$@"; else not_run "$1" "dry run: CUDA rows only"; fi
}

run_planned() {  # run_planned NAME: one stage of the plan (status 2: no such stage)
  local name=$1 src s
  local pytest=("$PY" -m pytest -q -p no:cacheprovider -rs)
  # One stage a file, each with its own JSON: pytest-benchmark writes it at the end of a session only.
  local bench=(env RSLAD_FAST_BENCH_SIZE=reduced "$PY" -m pytest -q -p no:cacheprovider --benchmark-only
               --benchmark-max-time=0.25 --benchmark-columns=median,iqr,rounds)
  local full=("$PY" -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-columns=median,iqr,rounds)
  local dev=cpu; [ "$GPU" = 1 ] && dev=cuda
  case $name in
    build)
      if [ "$GPU" = 1 ]; then  # this GPU's architecture only (+PTX, so the build test's PTX check holds for it too)
        stage build env TORCH_CUDA_ARCH_LIST="$ARCH+PTX" MAX_JOBS="$(nproc)" RSLAD_FAST_CUDA=1 \
          "$PY" setup.py build_ext --inplace
      else
        not_run build "dry run: the build that is here"
      fi ;;
    backend)
      stage backend "$PY" -c "import rslad_fast as r; print('ops backend', r.ops.backend(), '| CUDA kernels', \
r.ops.cuda_kernels_available())" ;;
    tests_cuda)  # the register check of test_cuda_build.py compiles for the default architectures and runs in CI
      stage tests_cuda "${pytest[@]}" tests -m "cuda or ptx" --ignore=tests/test_graphed.py \
        --ignore=tests/test_fast_path.py --junitxml="$WORK/tests_cuda.xml" ;;
    graphs)
      stage graphs "${pytest[@]}" -m cuda tests/test_graphed.py tests/test_fast_path.py --junitxml="$WORK/graphs.xml" ;;
    memcheck)  # no caching allocator under memcheck: an overrun inside a pooled block would be invisible
      if [ "$GPU" = 0 ]; then
        not_run memcheck "dry run: no sanitizer on the CPU (the plain sweep instead)"; run_sweep
      elif sanitizer_ready; then
        stage memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SAN[@]}" --tool memcheck \
          "$PY" scripts/gpu_probes.py sweep --json "$WORK/memcheck.json"
      else
        not_run memcheck "$SAN_REASON (the plain sweep instead)"; run_sweep
      fi ;;
    racecheck)
      if [ "$GPU" = 0 ]; then
        not_run racecheck "dry run: no sanitizer on the CPU"
      elif sanitizer_ready; then
        stage racecheck "${SAN[@]}" --tool racecheck "$PY" scripts/gpu_probes.py sweep --json "$WORK/racecheck.json"
      else
        not_run racecheck "$SAN_REASON"
      fi ;;
    sweep) run_sweep ;;
    big_pgd)
      if [ "$GPU" = 1 ]; then
        stage big_pgd "$PY" scripts/gpu_probes.py big-pgd --json "$WORK/big_pgd.json"
      else
        stage big_pgd "$PY" scripts/gpu_probes.py big-pgd --numel $((4 * 1024 * 1024 + 3)) --chunk 1000003 \
          --json "$WORK/big_pgd.json"
      fi ;;
    smoke)
      if [ "$GPU" = 1 ]; then
        stage smoke "$PY" scripts/gpu_smoke.py --out "$WORK/smoke"
      else
        stage smoke "$PY" scripts/gpu_smoke.py --out "$WORK/smoke" --tiny
      fi ;;
    bench_ops)
      if [ "$GPU" = 1 ]; then
        stage bench_ops "${bench[@]}" benchmarks/test_ops_bench.py -k "cuda and not compiled" \
          --benchmark-json="$WORK/bench_ops.json"
      else  # dry run: the same plumbing, a few CPU rows, timed (a JSON to summarise)
        stage bench_ops "$PY" -m pytest benchmarks/test_ops_bench.py -q -p no:cacheprovider --benchmark-only \
          --benchmark-max-time=0.05 -k "cpu and not compiled and not backward" --benchmark-json="$WORK/bench_ops.json"
      fi ;;
    bench_headline)
      cuda_only bench_headline "${bench[@]}" benchmarks/test_headline_bench.py -k cuda \
        --benchmark-json="$WORK/bench_headline.json" ;;
    bench_full_headline)
      stage "$name" "${full[@]}" benchmarks/test_headline_bench.py -k "$dev" --benchmark-json="$WORK/$name.json" ;;
    bench_inner)
      cuda_only bench_inner "${bench[@]}" benchmarks/test_inner_loop_bench.py -k cuda \
        --benchmark-json="$WORK/bench_inner.json" ;;
    bench_epoch)
      cuda_only bench_epoch "${bench[@]}" benchmarks/test_epoch_bench.py benchmarks/test_loaders_bench.py \
        -k "cuda and not compile" --benchmark-json="$WORK/bench_epoch.json" ;;
    bench_ops_compiled)  # inductor compiles each shape
      cuda_only bench_ops_compiled "${bench[@]}" benchmarks/test_ops_bench.py -k "cuda and compiled" \
        --benchmark-json="$WORK/bench_ops_compiled.json" ;;
    bench_epoch_compiled)
      cuda_only bench_epoch_compiled "${bench[@]}" benchmarks/test_epoch_bench.py -k "cuda and compile" \
        --benchmark-json="$WORK/bench_epoch_compiled.json" ;;
    bench_full_epoch)
      stage "$name" "${full[@]}" benchmarks/test_epoch_bench.py -k "$dev and not compile" \
        --benchmark-json="$WORK/$name.json" ;;
    bench_full_inner)
      stage "$name" "${full[@]}" benchmarks/test_inner_loop_bench.py -k "$dev" --benchmark-json="$WORK/$name.json" ;;
    bench_full_ops)
      stage "$name" "${full[@]}" benchmarks/test_ops_bench.py -k "$dev and not compiled" \
        --benchmark-json="$WORK/$name.json" ;;
    bench_full_loaders)
      stage "$name" "${full[@]}" benchmarks/test_loaders_bench.py -k "$dev" --benchmark-json="$WORK/$name.json" ;;
    bench_full_ops_compiled)
      stage "$name" "${full[@]}" benchmarks/test_ops_bench.py -k "$dev and compiled" \
        --benchmark-json="$WORK/$name.json" ;;
    bench_full_epoch_compiled)  # max-autotune on CUDA at full size: minutes of autotuning
      stage "$name" "${full[@]}" benchmarks/test_epoch_bench.py -k "$dev and compile" \
        --benchmark-json="$WORK/$name.json" ;;
    prepare)
      if [ -d "$DATA/cifar-10-batches-py" ]; then
        not_run prepare "CIFAR-10 is in $DATA already"; return 0
      fi
      src=""
      for s in shared_data ../shared/data; do [ -f "$s/prepare_cifar10.py" ] && { src=$s; break; }; done
      if [ -n "$src" ]; then
        stage prepare "$PY" "$src/prepare_cifar10.py" "$DATA"
      else
        not_run prepare "no CIFAR-10 source here (carry shared_data)"
      fi ;;
    quick_fp32|quick_bf16)
      if [ -d "$DATA/cifar-10-batches-py" ]; then
        stage "$name" "$PY" -m rslad_fast.train --preset quick --student mnv2 --data "$DATA" \
          --out "$WORK/$name" --amp "${name#quick_}" --overwrite --no-progress
      else
        not_run "$name" "no CIFAR-10 in $DATA (carry shared_data)"
      fi ;;
    quick_compare)
      if [ -f "$WORK/quick_fp32/metrics.jsonl" ] && [ -f "$WORK/quick_bf16/metrics.jsonl" ]; then
        stage quick_compare "$PY" scripts/compare_runs.py "$WORK/quick_fp32" "$WORK/quick_bf16" \
          --md "$WORK/quick_compare.md"
      else
        not_run quick_compare "needs both quick runs' metrics"
      fi ;;
    *) return 2 ;;
  esac
}

if [ "${GPU_CHECK_LIB:-0}" = 1 ]; then return 0 2>/dev/null || exit 0; fi

# ---- the run --------------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
MODE=${GPU_CHECK_MODE:-quick}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
PY=${PYTHON:-python3}
DATA=${DATA:-data}
START=$(date +%s)
DEADLINE=$((START + BUDGET - 20))  # 20 s kept for the last summary and archive
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT"
: >"$WORK/stages.tsv"
case $MODE in quick|full) ;; *) echo "GPU_CHECK_MODE must be quick or full, got $MODE" >&2; exit 2 ;; esac
if [ -n "${GPU_CHECK_STAGES:-}" ]; then
  read -ra PLAN <<<"$GPU_CHECK_STAGES"
elif [ "$MODE" = quick ]; then
  PLAN=("${PLAN_QUICK[@]}")
else
  PLAN=("${PLAN_FULL[@]}")
fi
for s in "${PLAN[@]}"; do
  [ -n "${EST[$s]:-}" ] || { echo "unknown stage in GPU_CHECK_STAGES: $s (known: ${!EST[*]})" >&2; exit 2; }
done
FAILED=0

# ---- what machine this is: one Python process (torch's import and CUDA's start cost 10-30 s on a cold machine) -
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (set GPU_CHECK_COMMIT)")}
{ echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "commit: $COMMIT"; echo "mode: $MODE"
  "$PY" - <<'EOF'
import sys

print("python:", sys.version.split()[0])
import torch

ok = torch.cuda.is_available()
print("torch:", torch.__version__, "cuda", torch.version.cuda)
print("gpu:", torch.cuda.get_device_name() if ok else "none")
print("arch:", "%d.%d" % torch.cuda.get_device_capability() if ok else "none")
print("cuda_available:", "yes" if ok else "no")
EOF
  echo "cores: $(nproc)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; } \
  >"$WORK/machine.txt" 2>&1
GPU=0; grep -qx "cuda_available: yes" "$WORK/machine.txt" && GPU=1
ARCH=$(sed -n 's/^arch: //p' "$WORK/machine.txt")
{ echo "dry_run: $([ $GPU = 1 ] && echo no || echo yes)"; echo "budget_s: $BUDGET"
  echo "deadline_s: $((BUDGET - 20))"; echo "startup_s: $(( $(date +%s) - START ))"; } >>"$WORK/machine.txt"
cat "$WORK/machine.txt"
if [ $GPU = 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  log "no CUDA GPU visible: stopping (GPU_CHECK_ALLOW_CPU=1 dry-runs the logic on the CPU)"; finalize; exit 2
fi
if [ $GPU = 0 ]; then  # the dry run's CPU sizes; its CUDA-only stages take no time, its memcheck is the sweep
  EST[smoke]=150; EST[bench_ops]=60; EST[memcheck]=${EST[sweep]}
  for s in build bench_headline bench_epoch bench_inner racecheck bench_ops_compiled bench_epoch_compiled; do
    EST[$s]=0
  done
fi
for s in "${PLAN[@]}"; do printf '%s\t%s\n' "$s" "${EST[$s]}"; done >"$WORK/plan.tsv"

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export RSLAD_FAST_BENCH_OUT=$WORK/bench_results
[ -d .whl/site ] && export PYTHONPATH=$PYTHONPATH:$ROOT/.whl/site  # torchattacks, pyautoattack (gpu_wheels.sh)

if [ $GPU = 1 ]; then
  # The toolkit: /usr/local/cuda when it has nvcc (a wrapper nvcc elsewhere can mislead torch), else nvcc's own.
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
  fi
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH=$CUDA_HOME/bin:$PATH
  case " ${PLAN[*]} " in *" memcheck "*|*" racecheck "*) start_sanitizer_probe ;; esac
  export RSLAD_FAST_REQUIRE=cuda
else
  export RSLAD_FAST_REQUIRE=compiled
fi
log "plan: ${PLAN[*]}"

for s in "${PLAN[@]}"; do
  run_planned "$s"
done

log "done in $(( $(date +%s) - START ))s;" \
  "$([ $FAILED = 0 ] && echo 'every stage that ran passed' || echo 'some stages failed')"
finalize
cat "$OUT/summary.md"
exit $FAILED
