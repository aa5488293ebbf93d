"""Keep freed tensor memory in the process: the CPU training step's hidden cost under glibc.

glibc serves each allocation above its mmap threshold (32 MiB at most) with a fresh `mmap` and gives it back
with `munmap` when freed. A training step allocates its largest tensors anew every time (logits and their
gradients: batch x seq x vocab floats, 131 MiB at batch 16, seq 256, 8,000 pieces), so the kernel maps,
faults in and zeroes every one of their pages again, step after step. Measured on 2 cores, 15 steps of
`retro pretrain` (small-cpu's GPT): 2.63M page faults and 8.0 s of kernel time under glibc's defaults,
0.33M and 1.5 s with this setting. `make bench-train` runs Retro both ways side by side: 1.13x faster steps
at 6 layers, d 384, seq 512, batch 8; 1.19x at 4 layers, d 256, seq 256, batch 16 (docs/benchmarks.md).

The price: freed memory stays with the process, so peak RSS is higher (+8% in that run, +40-70% in a bare
training loop) and is not handed back until exit. `RETRO_MALLOC=system` keeps glibc's defaults. No effect
outside glibc (macOS, musl). This module imports nothing beyond the standard library, so benchmark workers
in other venvs can use it.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: in effect, never trim the heap


def is_glibc() -> bool:
    """True on Linux with glibc, the only allocator this module tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_allocator() -> bool:
    """Serve large allocations from the heap and never trim it; True when glibc took both settings."""
    if os.environ.get("RETRO_MALLOC", "").lower() == "system" or not is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
