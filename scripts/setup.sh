#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: a virtualenv in .venv, torch + torchvision, the project with
# its compiled ops, the test/DALI extras, and CIFAR-10 prepared from ../shared/data when that is present.
#   bash scripts/setup.sh          # then use .venv/bin/python
# Environment: VENV (default .venv), RSLAD_FAST_CUDA (0 | 1 | auto, see setup.py), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1: the CUDA 13.0 builds (the CPU-only torch 2.13 wheel here cannot import
# torchvision). They also run on machines without a GPU.
pip install -q "torch==2.14.1" "torchvision==0.29.1" ninja pybind11 cmake "setuptools>=64" wheel numpy
# The extension compiles against the installed torch, hence --no-build-isolation.
MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation -e ".[test,dali,export,tensorboard]"
"$VENV/bin/python" -c "import rslad_fast; print('rslad_fast ops backend:', rslad_fast.ops.backend(), \
'| CUDA kernels:', rslad_fast.ops.cuda_kernels_available())"

# Real CIFAR-10 (JPEG re-encoded, see ../shared/data/README.md) in the official python layout.
if [ ! -d data/cifar-10-batches-py ] && [ -f ../shared/data/prepare_cifar10.py ]; then
  "$VENV/bin/python" ../shared/data/prepare_cifar10.py data
fi
