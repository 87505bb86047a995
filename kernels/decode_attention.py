"""Paged decode attention: one new token per sequence, K/V read from the blocks in place.

Layout: q [N, Hq, D] with sequence b's token at row cu_seqlens_q[b] (a sequence with no row this
step is skipped); k_cache/v_cache [num_blocks, block_size, Hkv, D]; context_lens [B] (this step's
token included, so the query sits at position context_len - 1 and sees every cached key, or with a
sliding window W the keys > context_len - 1 - W); block_tables [B, max_blocks]. The spec is
`attention_ref.paged_attention_ref` with one row per sequence.

Grid (B, Hkv, num_splits). One program takes one sequence, one KV head and one partition of the
context: the `group` query heads that share the KV head are the rows of one [BLOCK_H, D] query
tile, padded to BLOCK_H = max(16, next power of two >= group) rows because tl.dot needs >= 16, so
each K/V tile is read once for the whole group (Hq / Hkv times less traffic than a program per
query head) and both products run on tensor cores. Decode is bound by reading the cache: the
padded rows cost compute the SMs have to spare, not bytes. Scores, softmax and accumulator are
float32 (exp2 with scale * log2(e) folded in, as in `prefill_attention`); key tiles of BLOCK_N
are gathered key by key through the block table, so blocks may be in any order and BLOCK_N need
not equal block_size.

Split-KV (flash-decoding): with few sequences (batch * Hkv programs well under the SM count) a
long context would keep most SMs idle. The context is cut into num_splits partitions of
`partition_size` keys (a multiple of BLOCK_N); each program writes its partial running max m,
sum l (both in the log2 domain of the scores) and unnormalised accumulator acc [D] to float32
workspaces [B, Hq, S] / [B, Hq, S, D], and `_reduce_kernel` (grid (B, Hq)) combines them:
out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s. Partitions past a
sequence's length (or before its window) store m = -inf, l = 0 and weigh nothing, so one grid
sized from the host's max_context_len serves every length in the batch. With one split the
kernel normalises and writes the output itself: no workspace, no second launch.

`choose_num_splits` picks the split count from host ints only: enough programs for
`waves` x num_sms (132 on H100/H200), partitions of at least `min_partition` keys (256: shorter
ones spend more on the reduce than they save), at most `max_splits`. For CUDA graphs the grid is
fixed at capture: capture with the largest max_context_len the graph will replay with.

Tiles (`_tiles`): BLOCK_N keys and num_warps per head dim and dtype, the largest key tile that
compiled for sm_90 (triton 3.9, ptxas) without register spills: float16/bfloat16 64 keys with 4
warps at head_dim <= 64, 64 with 8 at <= 128, 32 with 4 above; float32 32/4, 32/8, 16/8. Spill-free
is all that was checked (no GPU was at hand): the speed of each choice is still to be measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_checks import check_host_int, check_paged, dot_upcast, next_power_of_2
from kernels.prefill_attention import LOG2_E

NUM_SMS_H100 = 132


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    scale_log2, window, partition_size, num_heads, num_splits,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWED: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) == row:
        return  # no token of this sequence in the step
    context_len = tl.load(context_lens_ptr + seq)
    lo = split * partition_size
    hi = tl.minimum(lo + partition_size, context_len)
    if WINDOWED:
        lo = tl.maximum(lo, context_len - window)

    heads = kv_head * GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        offset = k_pos % BLOCK_SIZE
        load_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + (block * stride_kb + offset * stride_kt)[:, None] + kv_head * stride_kh + dims[None, :],
                    mask=load_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_H, BLOCK_N]
        scores = tl.where(k_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (block * stride_vb + offset * stride_vt)[:, None] + kv_head * stride_vh + dims[None, :],
                    mask=load_mask, other=0.0)
        p = p.to(v_ptr.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    if SPLIT:
        part = (seq * num_heads + heads).to(tl.int64) * num_splits + split  # [BLOCK_H] into [B, Hq, S]
        tl.store(m_ptr + part, m_i, mask=head_ok)
        tl.store(l_ptr + part, l_i, mask=head_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None] & dim_ok[None, :])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # empty context (padding row) writes 0
        tl.store(out_ptr + row.to(tl.int64) * stride_on + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


@triton.jit
def _reduce_kernel(
    out_ptr, m_ptr, l_ptr, acc_ptr, cu_seqlens_q_ptr,
    num_heads, num_splits, stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) == row:
        return
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    part = (seq * num_heads + head).to(tl.int64) * num_splits + splits
    m = tl.load(m_ptr + part, mask=split_ok, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty partitions weigh 0
    total = tl.sum(weight * l, 0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                  other=0.0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row.to(tl.int64) * stride_on + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_ok)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, *, num_sms: int = NUM_SMS_H100,
                      waves: int = 2, min_partition: int = 256, max_splits: int = 32) -> int:
    """Partitions per sequence so that num_seqs * num_kv_heads * splits programs fill `waves` x
    num_sms, none shorter than min_partition keys. Host ints in, host int out."""
    programs = max(1, num_seqs * num_kv_heads)
    wanted = triton.cdiv(waves * num_sms, programs)
    by_length = max(1, max_context_len // min_partition)
    return max(1, min(wanted, by_length, max_splits))


def _tiles(head_dim_padded: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_warps): see the module docstring for where these come from."""
    if dtype == torch.float32:
        return (32, 4) if head_dim_padded <= 64 else (32, 8) if head_dim_padded <= 128 else (16, 8)
    return (64, 4) if head_dim_padded <= 64 else (64, 8) if head_dim_padded <= 128 else (32, 4)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_context_len: int,
    scale: float,
    *,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    num_sms: int = NUM_SMS_H100,
    block_n: int | None = None,
) -> torch.Tensor:
    """Decode attention for steps where every sequence has at most one row in q -> out [N, Hq, D].

    max_context_len: host copy of max(context_lens); it sizes the split grid (a larger value is
    correct, only slower). num_splits: None chooses with `choose_num_splits`; 1 is the single-pass
    kernel. The caller guarantees one row per sequence (metadata.max_seqlen_q <= 1): the kernel
    reads only row cu_seqlens_q[b] of each sequence."""
    group = check_paged(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, sliding_window)
    check_host_int(max_context_len, "max_context_len")
    num_seqs, num_heads, head_dim = context_lens.shape[0], q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    block_d = max(16, next_power_of_2(head_dim))
    default_block_n, num_warps = _tiles(block_d, q.dtype)
    block_n = block_n or default_block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot's minimum), got {block_n}")
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, num_sms=num_sms)
    check_host_int(num_splits, "num_splits")
    num_splits = max(1, num_splits)
    # Partitions are whole key tiles; rounding up may leave fewer partitions than asked.
    partition_size = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(max_context_len, 1), partition_size)
    split = num_splits > 1
    if split:
        m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # unused by the single-pass kernel
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, m, l, acc, cu_seqlens_q, context_lens, block_tables,
        scale * LOG2_E, sliding_window or 0, partition_size, num_heads, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=max(16, next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        WINDOWED=sliding_window is not None, SPLIT=split, UPCAST=dot_upcast(_decode_kernel, q.dtype),
        num_warps=num_warps, num_stages=2,
    )
    if split:
        _reduce_kernel[(num_seqs, num_heads)](
            out, m, l, acc, cu_seqlens_q, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=max(2, next_power_of_2(num_splits)), BLOCK_D=block_d,
            num_warps=4 if block_d <= 128 else 8,
        )
    return out
