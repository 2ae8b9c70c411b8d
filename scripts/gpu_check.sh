#!/usr/bin/env bash
# One command for the lent GPU machine (see DEVELOPERS.md): build the CUDA ops, run the CUDA tests and the
# benchmarks, and write a JSON + Markdown summary under $OUT.
#
#   here, once:  bash scripts/gpu_wheelhouse.sh; mkdir -p shared_data && cp ../shared/data/* shared_data/
#   device tool, call 1:  STAGES="build tests" bash scripts/gpu_check.sh   carry: ["wheelhouse"]
#   device tool, call 2:  STAGES=bench bash scripts/gpu_check.sh           (a call runs at most 600 s)
#   device tool, call 3:  STAGES=quick bash scripts/gpu_check.sh           carry: ["shared_data"]
# The calls must follow each other while the machine stays warm (it keeps the installed wheels and the
# in-place build); a cold machine needs call 1 again.
#
# That machine has Python 3.12 and torch 2.11.0+cu130 but no internet and no DALI. What else the checks
# import (pytest, pytest-benchmark, torchvision, tqdm, numpy, matplotlib, setuptools and ninja for the
# build, ...) comes from ./wheelhouse (48 MiB), filled here beforehand by scripts/gpu_wheelhouse.sh and
# carried along; the wheels stay installed while the machine stays warm. The CIFAR-10 archive and its
# prepare script (../shared/data, 18 MiB) do not fit in the same call's 64 MiB: call 3 carries them as
# ./shared_data (git-ignored). DALI's wheel is too big to carry in one call: the loader benchmark then
# reports DALI as skipped.
#
# Environment: OUT (default ./gpu_out), STAGES (default "build tests bench quick"), GPU_CHECK_ALLOW_CPU=1
# to dry-run the script's logic on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
STAGES=${STAGES:-build tests bench quick}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
status=0
step() {  # step NAME COMMAND...: run, log, remember failures, keep going
  local name=$1; shift
  log "== $name: $*"
  if "$@" >>"$OUT/$name.log" 2>&1; then log "   $name ok"; else log "   $name FAILED (see $name.log)"; status=1; fi
  tail -n 30 "$OUT/$name.log"
}

# 1. What machine this is.
{ nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"; git rev-parse HEAD; date -u; } \
  >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then log "no CUDA GPU visible: stopping"; exit 2; fi
  log "no GPU: dry run of the script's logic (GPU_CHECK_ALLOW_CPU=1)"
fi

# 2. Python packages from the carried wheelhouse (offline); a missing one makes its stage fail loudly.
if [ -d wheelhouse ]; then
  step wheels "$PY" -m pip install --no-index --find-links wheelhouse --no-deps wheelhouse/*.whl
fi

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export RSLAD_FAST_BENCH_OUT=$OUT/bench_results
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

# 3. Build the op library in place (no pip: pip would try to resolve dependencies online). The CUDA kernels
#    must build: RSLAD_FAST_CUDA=1 fails otherwise. Architecture: the GPU's own (detected).
if [[ " $STAGES " == *" build "* ]]; then
  cuda_flag=1; [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] && ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())" && cuda_flag=auto
  step build env RSLAD_FAST_CUDA=$cuda_flag MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace
  step backend "$PY" -c "import rslad_fast as r; print(r.ops.backend(), r.ops.cuda_kernels_available()); \
assert r.ops.backend() == 'compiled'"
fi

# 4. The CUDA tests (ops, CUDA graph, loaders), then the whole suite for anything that differs on this machine.
if [[ " $STAGES " == *" tests "* ]]; then
  step tests_cuda "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -rs --junitxml="$OUT/tests_cuda.xml"
  step tests_all "$PY" -m pytest tests -q -p no:cacheprovider -x -rs --junitxml="$OUT/tests_all.xml"
fi

# 5. The benchmarks at full size, with their JSON.
if [[ " $STAGES " == *" bench "* ]]; then
  step bench "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds
  step summary "$PY" scripts/bench_summary.py "$OUT/benchmarks.json" --json "$OUT/summary.json" --md "$OUT/summary.md"
  [ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
fi

# 6. Accuracy target: the quick preset in fp32 and in bf16, side by side, on real CIFAR-10 when it is here.
if [[ " $STAGES " == *" quick "* ]]; then
  data=${DATA:-data}
  for src in shared_data ../shared/data; do  # carried copy first, then a checkout's sibling
    if [ ! -d "$data/cifar-10-batches-py" ] && [ -f "$src/prepare_cifar10.py" ]; then
      step prepare "$PY" "$src/prepare_cifar10.py" "$data"
    fi
  done
  if [ -d "$data/cifar-10-batches-py" ]; then
    for amp in fp32 bf16; do
      step "quick_$amp" "$PY" -m rslad_fast.train --preset quick --student mnv2 --data "$data" \
        --out "$OUT/quick_$amp" --amp "$amp" --device cuda --overwrite
    done
    step quick_compare "$PY" scripts/compare_runs.py "$OUT/quick_fp32" "$OUT/quick_bf16" --md "$OUT/quick_compare.md"
  else
    log "no CIFAR-10 here: the bf16-vs-fp32 accuracy check is skipped"
  fi
fi

log "done, status $status; results under $OUT"
exit $status
