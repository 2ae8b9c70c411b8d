"""What this machine's CPU can do, read once per process: its model name and whether it has native bf16
arithmetic (avx512_bf16 or AMX), which decides the CPU defaults of ``resolve`` (``presets.CPU_CHOICES``)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{"model": model name, "flags": the bf16/AMX flags present, "native_bf16": bool}. Linux reads
    /proc/cpuinfo; elsewhere nothing is detected and native_bf16 is False (fp32, the safe default)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    found = sorted(f for f in flags if f in BF16_FLAGS or f.startswith("amx"))
    return {"model": model, "flags": found, "native_bf16": any(f in flags for f in BF16_FLAGS)}
