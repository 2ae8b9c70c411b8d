"""Benchmark fixtures (utilities live in bench_utils.py, importable without clashing with tests/)."""

import pytest
import torch
from bench_utils import device_name, git_commit

import rslad_fast


@pytest.fixture
def provenance(benchmark):
    """Fill the benchmark's extra_info with device, versions and commit; returns a setter for more fields."""

    def record(device, **fields):
        benchmark.extra_info.update(
            device=device_name(device),
            torch=torch.__version__,
            cuda=torch.version.cuda,
            commit=git_commit(),
            ops_backend=rslad_fast.ops.backend(),
            **fields,
        )

    return record
