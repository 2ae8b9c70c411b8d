#!/usr/bin/env bash
# Fill ./wheelhouse with the pure-Python and cp312 wheels that scripts/gpu_check.sh needs on the GPU machine
# (Python 3.12, torch 2.11.0+cu130, no internet). Carry it with the device tool: carry ["wheelhouse"].
# torchvision 0.26.0 is the release that matches torch 2.11.0.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheelhouse
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d wheelhouse "$@"; }
# The build needs setuptools (a Python 3.12 venv has none) and ninja (parallel compiles); the package needs
# numpy and matplotlib (curves.png); the data preparation needs Pillow.
dl pytest pluggy iniconfig packaging pytest-benchmark py-cpuinfo tqdm setuptools ninja
dl numpy pillow matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
dl "torchvision==0.26.0"
du -sh wheelhouse
