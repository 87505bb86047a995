"""Rotary position embedding, in the "neox" layout (rotate the two halves of each head, as Llama
uses) or the GPT-J layout (rotate interleaved pairs (2i, 2i + 1); `rope_gptj_ref`).

Shapes: q [N, num_heads, head_dim], k [N, num_kv_heads, head_dim], positions [N] (int64),
cos_sin_cache [max_positions, head_dim]: row p holds cos(p * inv_freq) in its first half and
sin(p * inv_freq) in its second half, float32. RoPE scaling (linear, llama3) is folded into
inv_freq when the cache is built, so every scaling type shares this one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_factor: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32 table read by `rope_ref`; inv_freq is [head_dim // 2]."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.to(torch.float32))  # [max_positions, head_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated (q, k); inputs are left untouched."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [N, head_dim // 2] each
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)  # [N, 1, head_dim]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RopeTorch:
    """`rope_ref` with the cos/sin rows gathered once per step, not once per layer.

    The runner calls `begin_step(positions)` before each forward pass (through `Ops.plan_step`),
    after writing the step's positions. The first layer that passes that same tensor gathers the
    tables; the others reuse them. The step, not the tensor's identity, is what the tables belong
    to: a persistent positions buffer refilled for the next step (as CUDA graph replay does), or a
    freed tensor's address reused by a new one, would otherwise be served the old tables. A call
    with positions no step was begun for (a model called directly) gathers fresh tables each time.
    Under graph capture the first layer's gather is recorded, so each replay gathers anew."""

    def __init__(self) -> None:
        self._positions: torch.Tensor | None = None  # the current step's, set by begin_step
        self._key: tuple[torch.Tensor, torch.dtype] | None = None  # (cos_sin_cache, dtype) of _tables
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_step(self, positions: torch.Tensor) -> None:
        """Drops the last step's tables; positions are this step's (already written)."""
        self._positions, self._key, self._tables = positions, None, None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is not self._positions:
            cos, sin = _neox_tables(positions, cos_sin_cache, q.dtype)
        else:
            key = (cos_sin_cache, q.dtype)
            if self._key is None or self._key[0] is not cos_sin_cache or self._key[1] != q.dtype:
                self._tables, self._key = _neox_tables(positions, cos_sin_cache, q.dtype), key
            cos, sin = self._tables
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _neox_tables(positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [N, 1, head_dim] in dtype: `rope_ref`'s tables."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [N, head_dim // 2] each
    return (torch.cat((cos, cos), dim=-1).unsqueeze(1).to(dtype),
            torch.cat((sin, sin), dim=-1).unsqueeze(1).to(dtype))


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_gptj_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J layout (Hugging Face `GPTJAttention`): frequency i rotates the pair (2i, 2i + 1). Same
    cos_sin_cache as `rope_ref`; returns rotated (q, k), inputs left untouched."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [N, head_dim // 2] each
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(1).to(q.dtype)  # [N, 1, head_dim]
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per token rotates all its q heads and k heads in place. A head's
# element pair (x1, x2) for frequency i sits at (i, i + D/2) in the neox layout and at (2i, 2i + 1)
# in the GPT-J layout; the program loads the pair halves as two [heads, D/2] tiles, reads the
# token's cos/sin row once for all heads, and writes
#     x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin
# computed in float32 and rounded once to q's dtype (the reference rounds after each product).
# q and k carry their own token/head/element strides, so they may be views of a fused qkv buffer.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(x_ptr, stride_h, stride_d, num_heads, cos, sin,
                  IS_NEOX: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (i < HALF)
    if IS_NEOX:
        first, second = i, i + HALF
    else:
        first, second = 2 * i, 2 * i + 1
    ptr1 = x_ptr + heads * stride_h + first * stride_d
    ptr2 = x_ptr + heads * stride_h + second * stride_d
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, positions_ptr, cache_ptr,
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_cache,
    num_q_heads, num_kv_heads,
    IS_NEOX: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    row = cache_ptr + position * stride_cache
    cos = tl.load(row + i, mask=i < HALF, other=0.0).to(tl.float32)  # [1, BLOCK_HALF]
    sin = tl.load(row + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qn, stride_qh, stride_qd, num_q_heads, cos, sin,
                  IS_NEOX, BLOCK_Q_HEADS, BLOCK_HALF, HALF)
    _rotate_heads(k_ptr + token * stride_kn, stride_kh, stride_kd, num_kv_heads, cos, sin,
                  IS_NEOX, BLOCK_KV_HEADS, BLOCK_HALF, HALF)


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [N, Hq, D] and k [N, Hkv, D] in place and returns them: `rope_ref` (is_neox) or
    `rope_gptj_ref` values. positions [N] int32/int64 must lie in [0, P) of cos_sin_cache [P, D]
    (not checked: that would sync with the device). q and k may have any strides (views of a fused
    qkv tensor), but must not overlap."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [N, heads, head_dim], got {list(q.shape)} and {list(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {list(k.shape)} must match q {list(q.shape)} in tokens and head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q and k must share a float32/float16/bfloat16 dtype, got {q.dtype} and {k.dtype}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [{num_tokens}] int32/int64, got {list(positions.shape)} {positions.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be [max_positions, {head_dim}], got {list(cos_sin_cache.shape)}")
    devices = {t.device for t in (q, k, positions, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"q, k, positions and cos_sin_cache must be on one device, got {sorted(map(str, devices))}")
    if num_tokens == 0:
        return q, k
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    positions = positions.contiguous()
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_q, block_kv = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(k.shape[1])
    # ~8 pair elements per thread over the q tile, the larger of the two.
    num_warps = min(max(block_q * block_half // 256, 1), 8)
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        *q.stride(), *k.stride(), cos_sin_cache.stride(0),
        num_q_heads, k.shape[1],
        IS_NEOX=is_neox, HALF=half, BLOCK_HALF=block_half,
        BLOCK_Q_HEADS=block_q, BLOCK_KV_HEADS=block_kv, num_warps=num_warps,
    )
    return q, k
