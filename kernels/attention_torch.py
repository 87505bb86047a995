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

Which rows decode, which blocks they read and their length masks are the same in every layer of
a step: they are worked out once, on the first layer's call, and kept on the step's metadata.

Memory traffic: the gather copies `B * L_max * Hkv * D` keys and values per layer; mixed lengths
pad to the longest decode sequence of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.ops import AttentionMetadata


@dataclass(frozen=True, slots=True)
class _DecodePlan:
    """The decode rows of a step, as every layer needs them."""

    q_rows: torch.Tensor  # [B] rows of q (one token each)
    block_ids: torch.Tensor  # [B * num_blocks] cache blocks to gather, sequence by sequence
    num_blocks: int
    lens: torch.Tensor  # [B] context lengths
    max_len: int
    visible: torch.Tensor  # [B, max_len] keys within each sequence's length


@dataclass(frozen=True, slots=True)
class _PrefillChunk:
    start: int  # rows start:end of q
    end: int
    context_len: int
    block_ids: torch.Tensor  # [num_blocks]


@dataclass(frozen=True, slots=True)
class _StepPlan:
    decode: _DecodePlan | None
    prefill: tuple[_PrefillChunk, ...]


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    plan = metadata.backend_plan
    if not isinstance(plan, _StepPlan):  # first layer of the step: plan once for all layers
        plan = metadata.backend_plan = _plan(metadata, k_cache.shape[1], q.device)
    out = torch.empty_like(q)
    if plan.decode is not None:
        _decode(q, k_cache, v_cache, plan.decode, scale, sliding_window, out)
    for chunk in plan.prefill:
        _prefill_one(q, k_cache, v_cache, chunk, scale, sliding_window, out)
    return out


def _plan(metadata: AttentionMetadata, block_size: int, device: torch.device) -> _StepPlan:
    cu_seqlens = metadata.cu_seqlens_q.tolist()
    context_lens = metadata.context_lens.tolist()
    decode, prefill = [], []
    for b, context_len in enumerate(context_lens):
        num_new = cu_seqlens[b + 1] - cu_seqlens[b]
        if num_new == 1:
            decode.append(b)
        elif num_new > 1:
            num_blocks = -(-context_len // block_size)
            block_ids = metadata.block_tables[b, :num_blocks].long()
            prefill.append(_PrefillChunk(cu_seqlens[b], cu_seqlens[b + 1], context_len, block_ids))
    decode_plan = None
    if decode:
        lens = torch.tensor([context_lens[b] for b in decode], device=device)
        max_len = max(context_lens[b] for b in decode)
        num_blocks = -(-max_len // block_size)
        rows = torch.tensor(decode, device=device)
        tables = metadata.block_tables.index_select(0, rows)[:, :num_blocks].long()
        decode_plan = _DecodePlan(
            q_rows=torch.tensor([cu_seqlens[b] for b in decode], device=device),
            block_ids=tables.reshape(-1),
            num_blocks=num_blocks,
            lens=lens,
            max_len=max_len,
            visible=torch.arange(max_len, device=device)[None, :] < lens[:, None],
        )
    return _StepPlan(decode_plan, tuple(prefill))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
    """Blocks of `batch` sequences, in order -> [batch, num_tokens, Hkv, D] (the first num_tokens slots)."""
    gathered = cache.index_select(0, block_ids)  # [batch * num_blocks, block_size, Hkv, D]
    return gathered.view(batch, -1, *cache.shape[2:])[:, :num_tokens]


def _decode(q, k_cache, v_cache, plan: _DecodePlan, scale, sliding_window, out):
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    batch = plan.q_rows.shape[0]
    k = _gather(k_cache, plan.block_ids, batch, plan.max_len).transpose(1, 2)  # [B, Hkv, L, D]
    v = _gather(v_cache, plan.block_ids, batch, plan.max_len).transpose(1, 2)
    queries = q.index_select(0, plan.q_rows).view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    visible = plan.visible
    if sliding_window is not None:  # per layer: models may mix windowed and full layers
        positions = torch.arange(plan.max_len, device=q.device)[None, :]
        visible = visible & (positions >= (plan.lens[:, None] - sliding_window))
    attended = F.scaled_dot_product_attention(
        queries, k, v, attn_mask=visible[:, None, None, :], scale=scale
    )  # [B, Hkv, group, D]
    out.index_copy_(0, plan.q_rows, attended.reshape(batch, num_heads, head_dim).to(q.dtype))


def _prefill_one(q, k_cache, v_cache, chunk: _PrefillChunk, scale, sliding_window, out):
    num_new = chunk.end - chunk.start
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    context_len = chunk.context_len
    k = _gather(k_cache, chunk.block_ids, 1, context_len).transpose(1, 2)  # [1, Hkv, L, D]
    v = _gather(v_cache, chunk.block_ids, 1, context_len).transpose(1, 2)
    queries = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    q_pos = torch.arange(context_len - num_new, context_len, device=q.device)[:, None]
    k_pos = torch.arange(context_len, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    attended = F.scaled_dot_product_attention(
        queries, k, v, attn_mask=visible, scale=scale, enable_gqa=num_heads != num_kv_heads
    )  # [1, H, n, D]
    out[chunk.start : chunk.end] = attended[0].transpose(0, 1).to(q.dtype)
