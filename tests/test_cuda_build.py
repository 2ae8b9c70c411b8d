"""What the CUDA build produces, checked without a GPU: register use against launch bounds, and PTX.

- Every CUDA kernel declares `__launch_bounds__` equal to the block it is launched with, and ptxas's
  registers per thread times that bound fit a block's 65,536 registers on every default architecture
  (the float64 reduction kernel once needed 66 x 1024 on sm_90: "too many resources requested for launch").
- The compiled library carries PTX for its newest architecture, so GPUs newer than the list still get a
  kernel image (JIT-compiled from the PTX).

Both need nvcc (CI has it: it compiles the .cu files); the PTX check also needs a library built with CUDA.
"""

import os
import re
import shutil
import struct
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import rslad_fast

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "ops" / "cuda").glob("*.cu"))
REGISTERS_PER_BLOCK = 65536
DEFAULT_ARCHS = ("80", "90")  # setup.py's default TORCH_CUDA_ARCH_LIST, 8.0;9.0+PTX


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else shutil.which("nvcc")


needs_nvcc = pytest.mark.skipif(
    _nvcc() is None or torch.version.cuda is None,
    reason="no nvcc (or a CPU-only torch): the CUDA sources cannot be compiled here",
)


def _compile(source: Path, arch: str, tmp: Path) -> tuple[str, str]:
    """(PTX text, ptxas -v report) of one source for one architecture."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths("cuda")] + [
        f"-I{ROOT / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    cmd = [
        _nvcc(),
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        "-cubin",
        f"-arch=sm_{arch}",
        "-Xptxas",
        "-v",
        "--keep",
        "--keep-dir",
        str(tmp),
        "-o",
        str(tmp / f"{source.stem}.cubin"),
        *includes,
        str(source),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = next(tmp.glob(f"{source.stem}*.ptx")).read_text()
    return ptx, done.stderr


def _max_threads(ptx: str) -> dict:
    """Entry name -> threads per block declared by __launch_bounds__ (None when undeclared)."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+)\s*\((.*?)\)\s*(.*?)\{", ptx, re.S):
        bound = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", m.group(3))
        out[m.group(1)] = None if bound is None else int(bound[1]) * int(bound[2]) * int(bound[3])
    return out


def _registers(report: str) -> dict:
    out, current = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            out[current] = int(m.group(1))
            current = None
    return out


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", DEFAULT_ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_every_kernel_fits_its_launch_bounds(source, arch, tmp_path):
    ptx, report = _compile(source, arch, tmp_path)
    bounds, registers = _max_threads(ptx), _registers(report)
    assert bounds and set(bounds) == set(registers), (bounds, registers)
    for name, threads in bounds.items():
        assert threads is not None, f"{name} has no __launch_bounds__"
        assert registers[name] * threads <= REGISTERS_PER_BLOCK, (name, registers[name], threads)


def _fatbin_entries(data: bytes) -> list:
    """(kind, arch) of every image in the fat binaries embedded in a shared library: kind 1 PTX, 2 ELF."""
    magic = struct.pack("<I", 0xBA55ED50)
    entries, i = [], data.find(magic)
    while i >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, i)
        j, end = i + header, i + header + size
        while j < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, j)
            entries.append((kind, struct.unpack_from("<I", data, j + 28)[0]))
            j += entry_header + entry_size
        i = data.find(magic, end)
    return entries


@pytest.mark.ptx
@pytest.mark.skipif(not rslad_fast.ops.cuda_kernels_available(), reason="the op library was built without CUDA")
def test_the_library_embeds_ptx_for_its_newest_architecture():
    import rslad_fast._C as lib

    entries = _fatbin_entries(Path(lib.__file__).read_bytes())
    archs = {arch for kind, arch in entries if kind == 2}
    assert archs, entries
    assert (1, max(archs)) in entries, f"no PTX for sm_{max(archs)}: {sorted(set(entries))}"
