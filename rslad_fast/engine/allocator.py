"""Keep freed CPU tensor memory in the process instead of handing it back to the OS after every step.

Why: on the CPU every forward/backward allocates and frees the activations (tens of MB per tensor for
MobileNetV2 at batch 64). glibc serves such blocks with mmap and returns them with munmap, or trims them
off the heap, so the next step page-faults and zeroes the same memory again. Measured on the project's
2-core machine (mnv2, batch 64, one thread, one eval-mode forward+input-gradient plus one training step,
x3): 17.4 s wall of which 5.7 s kernel time by default; 8.3 s wall and 0.2 s kernel time with the two
thresholds below raised to 1 GiB. The price: the process keeps its peak memory until it exits.

Linux/glibc only (``mallopt``); a silent no-op anywhere else. Process-wide and idempotent.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes: blocks below are served from (and kept in) the heap


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True when applied.

    The mmap threshold is set first: setting only the trim threshold would freeze glibc's adaptive mmap
    threshold at its 128 KiB default and make things worse (measured: 21 s kernel time)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
