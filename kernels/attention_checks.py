"""Input checks and launch helpers shared by the Triton attention launchers (`prefill_attention`,
`decode_attention`).

The kernels index raw pointers with the strides they are given, so a wrong shape or dtype would not
fail: it would read the wrong memory. Every launcher checks its inputs here first and raises
`ValueError` naming the argument. The checks read shapes, dtypes, strides and devices only: nothing
here synchronises the host with the device (the decode path runs inside CUDA graphs).
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# One program holds a [BLOCK_M, head_dim] query tile and its float32 accumulator in registers.
MAX_HEAD_DIM = 256


def check_heads(q: torch.Tensor, num_kv_heads: int, head_dim: int, name: str = "k_cache") -> int:
    """q [N, Hq, D] against KV heads; returns the GQA group size Hq // Hkv."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"q's head_dim must be contiguous (stride 1), got strides {q.stride()}")
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q's head_dim {q.shape[2]} != {name}'s head_dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's num_heads {num_heads} must be a multiple of {name}'s num_kv_heads {num_kv_heads}")
    return num_heads // num_kv_heads


def check_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int, names: tuple[str, str]) -> None:
    """k and v: same shape as each other, q's dtype and device, head_dim contiguous."""
    for tensor, name in zip((k, v), names):
        if tensor.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims, got shape {tuple(tensor.shape)}")
        if tensor.dtype != q.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} != q dtype {q.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device}, q on {q.device}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name}'s head_dim must be contiguous (stride 1), got strides {tensor.stride()}")
    if k.shape != v.shape:
        raise ValueError(f"{names[0]} shape {tuple(k.shape)} != {names[1]} shape {tuple(v.shape)}")


def check_index(tensor: torch.Tensor, name: str, dims: int, device: torch.device) -> None:
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dim(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, q on {device}")
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous, got strides {tensor.stride()}")


def check_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> int:
    """All of a paged attention call's inputs; returns the GQA group size."""
    check_kv(q, k_cache, v_cache, 4, ("k_cache", "v_cache"))
    group = check_heads(q, k_cache.shape[2], k_cache.shape[3])
    check_index(cu_seqlens_q, "cu_seqlens_q", 1, q.device)
    check_index(context_lens, "context_lens", 1, q.device)
    check_index(block_tables, "block_tables", 2, q.device)
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(f"cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} entries, got {cu_seqlens_q.shape[0]}")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have one row per sequence ({num_seqs}), got {block_tables.shape[0]}")
    check_scale_window(scale, sliding_window)
    return group


def check_scale_window(scale: float, sliding_window: int | None) -> None:
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def check_host_int(value, name: str) -> None:
    """Grid sizes come from host ints: a tensor here would force a device sync."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a Python int >= 0 (a host copy, not a tensor), got {value!r}")


def next_power_of_2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def dot_upcast(kernel, dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be upcast to float32 for `kernel`: triton's interpreter
    (TRITON_INTERPRET=1, decided when the kernel was decorated) multiplies bfloat16 as the raw
    uint16 bit patterns. bfloat16 products are exact in float32, so the upcast changes nothing but
    the speed; on a GPU the operands stay bfloat16 for the tensor cores."""
    return dtype == torch.bfloat16 and isinstance(kernel, InterpretedFunction)
