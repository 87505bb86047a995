"""glibc malloc settings for a worker: keep freed memory for reuse instead of returning it to the OS.

Torch on CPU allocates its large temporaries (activations, gathered KV blocks) with malloc, and glibc
serves blocks above a dynamic threshold with a fresh mmap and unmaps them on free: every such
tensor costs page faults on first touch, in every layer of every step. Keeping freed memory in the
heap (no mmap below 32 MiB, no trimming) made the SmolLM2-135M prefill of 32 prompts ~12% faster
and its decode step ~4% faster on the 2-core CPU; the heap then stays at its high-water mark, which
for a worker that holds its peak working set all the time anyway is the right trade. (vLLM's CPU
backend gets the same effect by preloading tcmalloc.)
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # an int: never trim in practice
_TOP_PAD_BYTES = 64 * 2**20  # grow the heap in large steps


def keep_freed_memory() -> bool:
    """Applies the settings; False where the C library is not glibc (nothing changes then)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, _TOP_PAD_BYTES),
    ))
