"""Builds rslad_fast._C, the op library (csrc/).

CUDAExtension when the installed torch is a CUDA build and nvcc is found, CppExtension otherwise.
Environment:
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda when it exists; /usr/local/bin/nvcc
                          on some machines is a wrapper that misleads torch's detection and breaks linking)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0+PTX" when no GPU is visible to detect: A100,
                          H100/H200 kernels, and sm_90 PTX that newer GPUs JIT-compile)
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
  RSLAD_FAST_CUDA         "0": build the CPU kernels only; "1": fail unless the CUDA kernels are built
"""

import glob
import os
import sys

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
want_cuda = os.environ.get("RSLAD_FAST_CUDA", "auto")
if want_cuda not in ("0", "1", "auto"):
    sys.exit(f"RSLAD_FAST_CUDA must be 0, 1 or auto, got {want_cuda!r}")
cuda_possible = (
    torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
)
if want_cuda == "1" and not cuda_possible:
    sys.exit(
        f"RSLAD_FAST_CUDA=1 but no CUDA build is possible: torch.version.cuda={torch.version.cuda}, "
        f"CUDA_HOME={CUDA_HOME}"
    )
use_cuda = cuda_possible and want_cuda != "0"
if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

sources = sorted(f for folder in ("", "cpu/", "autocast/") for f in glob.glob(f"csrc/ops/{folder}*.cpp"))
# OpenMP: without it at::parallel_for runs on one thread.
extra = {"cxx": ["-O3", "-fopenmp"]}
if use_cuda:
    sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "-lineinfo"]  # torch's CUDAExtension adds --expt-relaxed-constexpr itself
Extension = CUDAExtension if use_cuda else CppExtension
print(f"rslad_fast: building the {'CPU + CUDA' if use_cuda else 'CPU'} kernels", file=sys.stderr)

setup(
    name="rslad_fast",
    version="0.1.0",
    description="Fast, faithful adversarial robustness distillation (RSLAD) with fused PGD and softmax-KL ops",
    packages=find_packages(include=["rslad_fast", "rslad_fast.*"]),
    ext_modules=[
        Extension(
            "rslad_fast._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("RSLAD_FAST_PYTHON_MODULE", None)],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision", "numpy", "tqdm", "matplotlib", "pyautoattack==0.2.0"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "torchattacks==3.5.1"],
        "dali": ["nvidia-dali-cuda130"],
        # `python -m rslad_fast.export`: ONNX export (onnxscript: torch.onnx's dynamo exporter) and its
        # verification in ONNX Runtime
        "export": ["onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.32.0"],
        # `--tensorboard`: the per-epoch scalars as TensorBoard event files
        "tensorboard": ["tensorboard==2.21.0"],
    },
)
