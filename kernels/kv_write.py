"""Write the step's new keys and values into the paged KV cache.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. A slot is
block_id * block_size + offset, so the cache seen as [num_blocks * block_size, num_kv_heads, head_dim]
is indexed by slot directly. slot_mapping [N] int64 gives each new token's slot; a negative slot
(padding) writes nothing.
"""

from __future__ import annotations

import torch


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [N, num_kv_heads, head_dim] go to their slots in place."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)
