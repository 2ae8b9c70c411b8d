#!/usr/bin/env bash
# Build the C++ op library with CMake against the torch of the active Python, and run its smoke test.
#   scripts/cmake_build.sh [BUILD_DIR] [extra cmake args, e.g. -DRSLAD_FAST_CUDA=ON]
# A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit even for a CPU-only library:
# point it at CUDA_HOME (default /usr/local/cuda) and at the nvrtc that torch's pip wheels ship, which the
# system toolkit here lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cmake}
shift || true
python=${PYTHON:-python}
# The CMake of PyPI (installed by `pip install cmake`, next to the interpreter) knows nvcc's C++20 dialect,
# which torch's CMake targets require; Debian 12's CMake 3.25 does not.
cmake=$(dirname "$python")/cmake
[ -x "$cmake" ] || cmake=cmake
prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
if [ "$("$python" -c 'import torch; print(torch.version.cuda is not None)')" = True ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
  nvrtc=$("$python" - <<'PY'
import glob, os, torch
root = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")))
print(hits[0] if hits else "")
PY
)
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  # Without a GPU to detect, torch's CMake config needs the architectures spelled out.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
fi
"$cmake" -S . -B "$build" "${args[@]}" "$@"
"$cmake" --build "$build" -j "${MAX_JOBS:-2}"
"$build/rslad_fast_ops_smoke"
