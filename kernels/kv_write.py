"""Write the step's new keys and values into the paged KV cache.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. A slot is
block_id * block_size + offset, so the cache seen as [num_blocks * block_size, num_kv_heads, head_dim]
is indexed by slot directly. slot_mapping [N] int64 gives each new token's slot; a negative slot
(padding) writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [N, num_kv_heads, head_dim] go to their slots in place."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


# One program per new token writes its k and v rows ([Hkv, D] each) to the slot's place in both
# caches; a program whose slot is negative returns at once, so padding rows cost a load of the slot
# and nothing else, and the launcher needs no host-side filtering (no device sync). k and v are read
# through their own strides (views of a fused qkv buffer) and cast to the cache's dtype on store.
@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,  # k_cache and v_cache share one layout
    num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (d < HEAD_DIM)
    cache_offsets = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs \
        + heads * stride_ch + d * stride_cd
    k = tl.load(k_ptr + token * stride_kn + heads * stride_kh + d * stride_kd, mask=mask, other=0.0)
    v = tl.load(v_ptr + token * stride_vn + heads * stride_vh + d * stride_vd, mask=mask, other=0.0)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`write_kv_ref` in one kernel launch: k, v [N, Hkv, D] (any strides) to their slots of
    k_cache, v_cache [num_blocks, block_size, Hkv, D] in place. Slots must be < num_blocks *
    block_size (not checked: that would sync with the device); negative slots are skipped."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [N, num_kv_heads, head_dim], got {list(k.shape)} and {list(v.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                         f"got {list(k_cache.shape)} and {list(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share strides and dtype")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be [{num_tokens}] int32/int64, got {list(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"k, v, the caches and slot_mapping must be on one device, got {sorted(map(str, devices))}")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        *k.stride(), *v.stride(), *k_cache.stride(),
        num_kv_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
