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
a step: they are worked out once, before the forward pass (`plan_torch` / `plan_cpu`, the backend's
`Ops.plan_step`), from the host lists the runner already has, and kept on the step's metadata. No
layer reads a device tensor back. A caller that did not plan (a test calling the op directly) gets
the plan made on the first call, from the metadata's tensors read back once.

Memory traffic: the gather copies `rows * L_max * Hkv * D` keys and values per layer and call,
and every row pads to the longest of its call. With prompts of 40 to 300 tokens, one call for 32
decode rows copied and attended over ~45% padding; so the rows are sorted by length and split into
groups of similar length (`_length_groups`), one gather and one SDPA call each. On the 2-core CPU
this took a 32-sequence decode step of SmolLM2-135M from about 112 to 100 ms.

`paged_attention_cpu` is the same with the decode rows sent to the compiled CPU kernel
(`kernels/paged_decode_cpu.py`), which reads the blocks in place: no gather, no padding, no
buffers. Prefill chunks take the path above. Where the kernel is not built, does not load or does
not take the inputs (a CUDA tensor, another dtype), it is exactly `paged_attention_torch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import paged_decode_cpu
from kernels.ops import AttentionMetadata, StepHost


@dataclass(frozen=True, slots=True)
class _DecodePlan:
    """The decode rows of a step, as every layer needs them."""

    q_rows: torch.Tensor  # [B] rows of q (one token each)
    block_ids: torch.Tensor  # [B * num_blocks] cache blocks to gather, sequence by sequence
    num_blocks: int
    lens: torch.Tensor  # [B] context lengths
    max_len: int
    visible: torch.Tensor  # [B, max_len] keys within each sequence's length
    # visible as SDPA's additive mask [B, 1, 1, max_len]: converted once, not in every layer's call
    additive_mask: torch.Tensor
    # Where every layer's gather lands: allocated once per step, not once per layer.
    k_gathered: torch.Tensor  # [B * num_blocks, block_size * Hkv * D]
    v_gathered: torch.Tensor


@dataclass(frozen=True, slots=True)
class _PrefillChunk:
    start: int  # rows start:end of q
    end: int
    context_len: int
    block_ids: torch.Tensor  # [num_blocks]


@dataclass(frozen=True, slots=True)
class _KernelDecodePlan:
    """The decode rows of a step as the compiled kernel takes them."""

    seq_ids: torch.Tensor  # [R] int32: sequences with one new token
    q_rows: torch.Tensor  # [R] int64: their rows of q
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows contiguous


@dataclass(frozen=True, slots=True)
class _StepPlan:
    decode: tuple[_DecodePlan, ...]  # one per group of decode rows of similar length (torch path)
    prefill: tuple[_PrefillChunk, ...]
    kernel_decode: _KernelDecodePlan | None = None  # the decode rows, when the kernel takes them
    with_kernel: bool = False  # planned for the kernel (layers of one step all take the same path)
    host: StepHost | None = None  # what it was planned from: a re-plan for the other path needs no sync


# Each extra group saves padding but costs two more gathers and one more SDPA call per layer.
_MAX_DECODE_GROUPS = 4
_MIN_ROWS_PER_GROUP = 8


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    return _attend(q, k_cache, v_cache, metadata, scale, sliding_window, None)


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    op = paged_decode_cpu.load()
    if op is not None and not paged_decode_cpu.supports(q, k_cache):
        op = None
    return _attend(q, k_cache, v_cache, metadata, scale, sliding_window, op)


def plan_torch(metadata: AttentionMetadata, host: StepHost, k_cache: torch.Tensor) -> None:
    """The torch backend's plan_step: the step's plan, before the forward pass, from host lists."""
    metadata.backend_plan = _plan(metadata, host, k_cache, with_kernel=False)


def plan_cpu(metadata: AttentionMetadata, host: StepHost, k_cache: torch.Tensor) -> None:
    """The cpu backend's plan_step. Whether the kernel takes the step is judged on the cache (q is
    not made yet; it has the compute dtype, which usually is the cache's): a q it refuses after all
    is re-planned for the torch path from the same host lists, still without a sync."""
    with_kernel = paged_decode_cpu.load() is not None and paged_decode_cpu.supports(k_cache, k_cache)
    metadata.backend_plan = _plan(metadata, host, k_cache, with_kernel)


def _attend(q, k_cache, v_cache, metadata: AttentionMetadata, scale, sliding_window, decode_op) -> torch.Tensor:
    plan = metadata.backend_plan
    with_kernel = decode_op is not None
    if not isinstance(plan, _StepPlan) or plan.with_kernel != with_kernel:
        # Not planned before the forward pass (a direct call: read the lists back, once), or planned
        # for the other path (the kernel does not take this q): plan once for all layers.
        host = plan.host if isinstance(plan, _StepPlan) else _read_host(metadata)
        plan = metadata.backend_plan = _plan(metadata, host, k_cache, with_kernel)
    out = torch.empty_like(q)
    if plan.kernel_decode is not None:
        rows = plan.kernel_decode
        paged_decode_cpu.paged_decode_cpu(decode_op, out, q, k_cache, v_cache, rows.block_tables, rows.context_lens,
                                          rows.seq_ids, rows.q_rows, scale, sliding_window)
    for decode in plan.decode:
        _decode(q, k_cache, v_cache, decode, scale, sliding_window, out)
    for chunk in plan.prefill:
        _prefill_one(q, k_cache, v_cache, chunk, scale, sliding_window, out)
    return out


def _read_host(metadata: AttentionMetadata) -> StepHost:
    """The host lists of a step nobody planned: a device sync, for direct callers only."""
    return StepHost(cu_seqlens_q=metadata.cu_seqlens_q.tolist(), context_lens=metadata.context_lens.tolist())


def _plan(metadata: AttentionMetadata, host: StepHost, k_cache: torch.Tensor, with_kernel: bool = False) -> _StepPlan:
    block_size = k_cache.shape[1]
    cu_seqlens = host.cu_seqlens_q
    context_lens = host.context_lens
    decode, prefill = [], []
    for b, context_len in enumerate(context_lens):
        num_new = cu_seqlens[b + 1] - cu_seqlens[b]
        if num_new == 1:
            decode.append(b)
        elif num_new > 1:
            num_blocks = -(-context_len // block_size)
            block_ids = metadata.block_tables[b, :num_blocks].long()
            prefill.append(_PrefillChunk(cu_seqlens[b], cu_seqlens[b + 1], context_len, block_ids))
    if with_kernel and decode:
        device = k_cache.device
        kernel_decode = _KernelDecodePlan(
            seq_ids=torch.tensor(decode, dtype=torch.int32, device=device),
            q_rows=torch.tensor([cu_seqlens[b] for b in decode], dtype=torch.int64, device=device),
            context_lens=metadata.context_lens.to(torch.int32).contiguous(),
            block_tables=metadata.block_tables.to(torch.int32).contiguous(),
        )
        return _StepPlan((), tuple(prefill), kernel_decode, with_kernel=True, host=host)
    groups = _length_groups(decode, context_lens)
    decode_plans = tuple(_decode_plan(group, cu_seqlens, context_lens, metadata.block_tables, k_cache)
                         for group in groups)
    return _StepPlan(decode_plans, tuple(prefill), with_kernel=with_kernel, host=host)


def _length_groups(rows: list[int], context_lens: list[int]) -> list[list[int]]:
    """Decode rows sorted by context length, in up to _MAX_DECODE_GROUPS groups of equal size."""
    if not rows:
        return []
    rows = sorted(rows, key=context_lens.__getitem__)
    num_groups = max(1, min(_MAX_DECODE_GROUPS, len(rows) // _MIN_ROWS_PER_GROUP))
    size = -(-len(rows) // num_groups)
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _decode_plan(rows: list[int], cu_seqlens: list[int], context_lens: list[int], block_tables: torch.Tensor,
                 k_cache: torch.Tensor) -> _DecodePlan:
    device, block_size = k_cache.device, k_cache.shape[1]
    lens = torch.tensor([context_lens[b] for b in rows], device=device)
    max_len = max(context_lens[b] for b in rows)
    num_blocks = -(-max_len // block_size)
    tables = block_tables.index_select(0, torch.tensor(rows, device=device))[:, :num_blocks].long()
    visible = torch.arange(max_len, device=device)[None, :] < lens[:, None]
    return _DecodePlan(
        q_rows=torch.tensor([cu_seqlens[b] for b in rows], device=device),
        block_ids=tables.reshape(-1),
        num_blocks=num_blocks,
        lens=lens,
        max_len=max_len,
        visible=visible,
        additive_mask=torch.zeros(visible.shape, dtype=k_cache.dtype, device=device).masked_fill_(
            ~visible, float("-inf"))[:, None, None, :],
        k_gathered=k_cache.new_empty(len(rows) * num_blocks, k_cache[0].numel()),
        v_gathered=k_cache.new_empty(len(rows) * num_blocks, k_cache[0].numel()),
    )


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, batch: int, num_tokens: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks of `batch` sequences, in order -> [batch, num_tokens, Hkv, D] (the first num_tokens slots).

    Whole blocks are copied as rows of a 2-D view, into `out` when given: index_select over the 4-D
    cache, into a fresh tensor, took 4x (2-D) to 15x (and `out`) as long for a decode step's blocks."""
    rows = cache.view(cache.shape[0], -1)  # [num_blocks, block_size * Hkv * D]
    gathered = torch.index_select(rows, 0, block_ids, out=out) if out is not None else rows.index_select(0, block_ids)
    return gathered.view(batch, -1, *cache.shape[2:])[:, :num_tokens]


def _decode(q, k_cache, v_cache, plan: _DecodePlan, scale, sliding_window, out):
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    batch = plan.q_rows.shape[0]
    k = _gather(k_cache, plan.block_ids, batch, plan.max_len, plan.k_gathered).transpose(1, 2)  # [B, Hkv, L, D]
    v = _gather(v_cache, plan.block_ids, batch, plan.max_len, plan.v_gathered).transpose(1, 2)
    queries = q.index_select(0, plan.q_rows).view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = plan.additive_mask
    if sliding_window is not None:  # per layer: models may mix windowed and full layers
        positions = torch.arange(plan.max_len, device=q.device)[None, :]
        mask = (plan.visible & (positions >= (plan.lens[:, None] - sliding_window)))[:, None, None, :]
    attended = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, group, D]
    out.index_copy_(0, plan.q_rows, attended.reshape(batch, num_heads, head_dim).to(q.dtype))


def _prefill_one(q, k_cache, v_cache, chunk: _PrefillChunk, scale, sliding_window, out):
    num_new = chunk.end - chunk.start
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    context_len = chunk.context_len
    # In the cache's dtype. In bf16, SDPA's rounding depends on how a prompt is cut into chunks and
    # on whether a token is decoded or recomputed after a preemption, so a bf16 cache is greedy-close,
    # not identical, under batching; in float32 it was identical, but cost 7% of bf16's c=32 tok/s.
    k = _gather(k_cache, chunk.block_ids, 1, context_len).transpose(1, 2)  # [1, Hkv, L, D]
    v = _gather(v_cache, chunk.block_ids, 1, context_len).transpose(1, 2)
    queries = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if num_new == context_len and sliding_window is None:
        # A whole prompt with nothing cached: plain causal attention, no mask to build or read.
        attended = F.scaled_dot_product_attention(
            queries, k, v, is_causal=True, scale=scale, enable_gqa=num_heads != num_kv_heads
        )
        out[chunk.start : chunk.end] = attended[0].transpose(0, 1).to(q.dtype)
        return
    q_pos = torch.arange(context_len - num_new, context_len, device=q.device)[:, None]
    k_pos = torch.arange(context_len, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    attended = F.scaled_dot_product_attention(
        queries, k, v, attn_mask=visible, scale=scale, enable_gqa=num_heads != num_kv_heads
    )  # [1, H, n, D]
    out[chunk.start : chunk.end] = attended[0].transpose(0, 1).to(q.dtype)
