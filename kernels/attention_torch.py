"""Paged attention for the torch backend: the same contract as `attention_ref.paged_attention_ref`
(the spec), computed in few large calls instead of a Python loop over sequences.

Decode rows (sequences with one new token) are the bulk of a busy step. They go through one
batched `scaled_dot_product_attention`: every decode sequence's blocks are gathered into
`[B, L_max, Hkv, D]` and keys past a sequence's own length are masked. GQA costs no copy: the
`group` query heads that share a KV head are laid out as that KV head's query rows
(`q [B, Hkv, group, D]` against `k [B, Hkv, L, D]`), which is exactly what a decode token needs,
since it sees every cached key of its sequence. Prefill chunks (a few per step) run one SDPA call
each with a causal mask offset by the tokens already cached.

Scores run in the cache's dtype: the CPU flash-attention kernel accumulates in float32 for bfloat16
and float16 inputs, and converting every gathered block to float32 first cost more than the
attention itself.

Memory traffic: the gather copies `B * L_max * Hkv * D` keys and values per layer; mixed lengths
pad to the longest decode sequence of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.ops import AttentionMetadata


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cu_seqlens = metadata.cu_seqlens_q.tolist()
    context_lens = metadata.context_lens.tolist()
    decode, prefill = [], []
    for b, context_len in enumerate(context_lens):
        num_new = cu_seqlens[b + 1] - cu_seqlens[b]
        if num_new == 1:
            decode.append(b)
        elif num_new > 1:
            prefill.append(b)
    if decode:
        _decode(q, k_cache, v_cache, metadata, scale, sliding_window, decode, cu_seqlens, context_lens, out)
    for b in prefill:
        _prefill_one(q, k_cache, v_cache, metadata, scale, sliding_window, b, cu_seqlens, context_lens[b], out)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, num_blocks] block ids -> [B, num_tokens, Hkv, D] (the first num_tokens slots)."""
    batch, num_blocks = block_tables.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))  # [B * num_blocks, block_size, Hkv, D]
    return gathered.view(batch, num_blocks * cache.shape[1], *cache.shape[2:])[:, :num_tokens]


def _decode(q, k_cache, v_cache, metadata, scale, sliding_window, rows, cu_seqlens, context_lens, out):
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    lens = torch.tensor([context_lens[b] for b in rows], device=q.device)
    max_len = int(lens.max())
    num_blocks = -(-max_len // block_size)
    index = torch.tensor(rows, device=q.device)
    tables = metadata.block_tables.index_select(0, index)[:, :num_blocks].long()
    k = _gather(k_cache, tables, max_len).transpose(1, 2)  # [B, Hkv, L, D]
    v = _gather(v_cache, tables, max_len).transpose(1, 2)
    q_rows = torch.tensor([cu_seqlens[b] for b in rows], device=q.device)
    queries = q.index_select(0, q_rows).view(len(rows), num_kv_heads, group, head_dim)
    positions = torch.arange(max_len, device=q.device)[None, :]
    visible = positions < lens[:, None]  # [B, L]
    if sliding_window is not None:
        visible &= positions >= (lens[:, None] - sliding_window)
    attended = F.scaled_dot_product_attention(
        queries, k, v, attn_mask=visible[:, None, None, :], scale=scale
    )  # [B, Hkv, group, D]
    out.index_copy_(0, q_rows, attended.reshape(len(rows), num_heads, head_dim).to(q.dtype))


def _prefill_one(q, k_cache, v_cache, metadata, scale, sliding_window, b, cu_seqlens, context_len, out):
    start, end = cu_seqlens[b], cu_seqlens[b + 1]
    num_new = end - start
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    num_blocks = -(-context_len // k_cache.shape[1])
    tables = metadata.block_tables[b : b + 1, :num_blocks].long()
    k = _gather(k_cache, tables, context_len).transpose(1, 2)  # [1, Hkv, L, D]
    v = _gather(v_cache, tables, context_len).transpose(1, 2)
    queries = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    q_pos = torch.arange(context_len - num_new, context_len, device=q.device)[:, None]
    k_pos = torch.arange(context_len, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    attended = F.scaled_dot_product_attention(
        queries, k, v, attn_mask=visible, scale=scale, enable_gqa=num_heads != num_kv_heads
    )  # [1, H, n, D]
    out[start:end] = attended[0].transpose(0, 1).to(q.dtype)
