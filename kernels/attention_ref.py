"""Paged attention over the block pool: the torch reference, one sequence at a time.

Inputs (see `kernels.ops.AttentionMetadata`):
  q            [N, num_heads, head_dim]  all sequences' new tokens, concatenated
  k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; this step's K/V already written
  cu_seqlens_q [B + 1]   rows cu[b]:cu[b+1] of q belong to sequence b
  context_lens [B]       tokens of sequence b in the cache, this step's included
  block_tables [B, max_blocks]  cache blocks of sequence b in order (padding never read)

Masking: sequence b's new tokens sit at positions context_len - num_new .. context_len - 1, so query i
sees key j when j <= pos(i) (causal) and, with a sliding window W, when j > pos(i) - W (the W most
recent tokens, itself included: Mistral's convention). One code path serves prefill, chunked prefill,
prefix-cache hits and decode. GQA: query head h reads kv head h // (num_heads // num_kv_heads).
Scores and softmax run in float32.
"""

from __future__ import annotations

import torch

from kernels.ops import AttentionMetadata


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    cu_seqlens = metadata.cu_seqlens_q.tolist()
    context_lens = metadata.context_lens.tolist()
    for b, context_len in enumerate(context_lens):
        start, end = cu_seqlens[b], cu_seqlens[b + 1]
        num_new = end - start
        if num_new == 0:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = metadata.block_tables[b, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len].float()  # [L, Hkv, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len].float()
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale  # [H, num_new, L]
        q_pos = torch.arange(context_len - num_new, context_len, device=q.device)[:, None]
        k_pos = torch.arange(context_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
