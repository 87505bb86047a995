"""The CPU paged decode kernel: loading it, and its launcher. The spec is `attention_ref.paged_attention_ref`.

The kernel (`kernels/csrc/paged_decode_cpu.cpp`, its header comment has the memory layout and the
loop) attends one new token per sequence over that sequence's cached keys and values, reading
them in place through the block table, where the torch path copies every block into a padded
buffer first. `kernels.attention_torch.paged_attention_cpu` sends a step's decode rows here.

The library is built by `scripts/setup` (`kernels.paged_decode_cpu_build`); `load()` only loads an
existing build, so a worker never compiles at start-up. Where there is none, or it does not load,
`load()` returns None once with a log line saying why, and the torch path serves.
"""

from __future__ import annotations

import logging
from functools import cache

import torch

from kernels import paged_decode_cpu_build

log = logging.getLogger(__name__)

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Library:
    """The operator once loaded, or why it is not (each kind of attempt is made once per process)."""

    def __init__(self) -> None:
        self.op: object | None = None
        self.reason: str | None = None
        self.tried_build = False

    def get(self, build: bool) -> object | None:
        if self.op is not None or (self.reason is not None and (self.tried_build or not build)):
            return self.op
        self.tried_build |= build
        try:
            path = paged_decode_cpu_build.build() if build else paged_decode_cpu_build.library_path()
        except (paged_decode_cpu_build.BuildError, OSError) as error:
            self.reason = str(error)
            return None
        if not path.exists():
            self.reason = (f"not built ({path.name} missing): run scripts/setup or "
                           "`python -m kernels.paged_decode_cpu_build`")
            return None
        try:
            torch.ops.load_library(str(path))
            self.op = torch.ops.tensoryard_decode.paged_decode
        except (OSError, RuntimeError, AttributeError) as error:
            self.reason = f"{path.name} did not load: {error}"
        return self.op


_LIBRARY = _Library()


def load(build: bool = False) -> object | None:
    """The kernel operator, or None (logged once) where it is not built or does not load.
    build=True compiles it first if needed (tests, benchmarks), which takes ~20 s."""
    op = _LIBRARY.get(build)
    if op is None:
        _log_unavailable(_LIBRARY.reason)
    return op


def unavailable_reason() -> str | None:
    """Why the last load() returned None (None once the kernel is loaded)."""
    return None if _LIBRARY.op is not None else _LIBRARY.reason


@cache
def _log_unavailable(reason: str) -> None:
    log.warning("CPU paged decode kernel unavailable, the torch decode path serves: %s", reason)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (else the caller uses the torch path)."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in CACHE_DTYPES
            and k_cache.dtype in CACHE_DTYPES and q.stride(-1) == 1 and k_cache.stride(-1) == 1
            and q.shape[1] % k_cache.shape[2] == 0)


def paged_decode_cpu(
    op: object,
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    seq_ids: torch.Tensor,
    q_rows: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Writes out[q_rows[i]] = attention of q[q_rows[i]] over sequence seq_ids[i]'s cached tokens.

    q, out [N, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
    int32; context_lens [B] int32 (this step's token included); seq_ids [R] int32; q_rows [R] int64.
    Only rows named in q_rows are written. Index tensors are converted here if they come in another
    dtype or layout; the kernel checks shapes and strides and raises RuntimeError on a mismatch."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if block_tables.stride(-1) != 1 or block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32).contiguous()
    op(out, q, k_cache, v_cache, block_tables, context_lens.to(torch.int32).contiguous(),
       seq_ids.to(torch.int32).contiguous(), q_rows.to(torch.int64).contiguous(), float(scale),
       sliding_window or 0)
