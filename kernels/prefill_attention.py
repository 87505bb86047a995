"""Varlen flash-attention for prefill, reading K/V from the paged cache (and a non-paged entry).

Layout (`kernels.ops.AttentionMetadata`):
  q               [N, Hq, D]   the step's new tokens, sequence b's rows are cu_seqlens_q[b]:[b+1]
  k_cache/v_cache [num_blocks, block_size, Hkv, D]; this step's K/V already written
  context_lens    [B]          tokens of sequence b in the cache, this step's included
  block_tables    [B, max_blocks]  cache block of sequence b's tokens j*block_size .. (j+1)*block_size-1
Sequence b's n new tokens sit at positions context_len-n .. context_len-1, so one kernel serves a
whole prompt, a chunk over a cached prefix (prefix-cache hit, chunked prefill) and a decode row
(n = 1). Causal: query at p sees keys 0..p. Bidirectional (encoders): every query sees the whole
context. Sliding window W: keys > p - W only. The spec is `attention_ref.paged_attention_ref`
(causal) and `varlen_attention_ref` here (bidirectional and non-paged).

Grid (cdiv(max_seqlen_q * group, BLOCK_M), B, Hkv), from host ints only. GQA is folded into the tile
rows: row r of a program is token r // group and query head kv_head * group + r % group, so the
group's query heads share every K/V tile loaded (read once per group, not once per head), and a
decode row in a mixed step fills `group` rows of the tile instead of one. Programs whose rows start
past their sequence's n * group exit at once (the grid is sized for the longest sequence).

Each program runs the online softmax (Dao's flash-attention) over key tiles of BLOCK_N: scores
by tl.dot in float32 (the inputs in their own dtype: tensor cores for float16/bfloat16, IEEE float32
for float32, not tf32, so float32 stays close to the reference), scaled by scale * log2(e) so the
exponentials are exp2, probabilities cast to V's dtype for the second tl.dot (as flash-attention
does), accumulator in float32. Key tiles are gathered key by key through the block table (block id,
offset in block), so BLOCK_N need not match block_size and blocks may be in any order. Only key tiles
a row can see are visited: up to the tile's last query position (causal) and from its first query's
window start (sliding window). head_dim pads to BLOCK_D = next power of two >= 16 (tl.dot's minimum)
with masked loads, so 40, 80, 96 or 17 work.

Tile sizes (`_tiles`, BLOCK_M x BLOCK_N, warps): for float16/bfloat16 128 x 64 / 8 at head_dim
<= 64, 128 x 32 / 8 at <= 128, 64 x 16 / 8 above; for float32 64 x 32 / 8, 32 x 16 / 8, 32 x 16 / 8;
2 stages. Each is the largest tile that compiled for sm_90 (triton 3.9, ptxas) without register
spills in a sweep of BLOCK_M 32-128, BLOCK_N 16-64, 4/8 warps (4 warps spilled at these sizes).
Spill-free is all that was checked (no GPU was at hand): speed is still to be measured, and larger
tiles with more stages may pay on an H100 once the loop splits masked from unmasked tiles. The
launcher takes block_m / block_n overrides, which the tests use to cover several tiles at small
lengths.

Under triton's interpreter (no GPU) the bfloat16 tl.dot multiplies raw bit patterns, so there
both operands are upcast to float32 first (`attention_checks.dot_upcast`): exact for bfloat16
products, and the probabilities are still rounded to bfloat16 as on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_checks import (
    check_heads, check_host_int, check_index, check_kv, check_paged, check_scale_window, dot_upcast,
    next_power_of_2,
)

LOG2_E = 1.4426950408889634


def varlen_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, causal: bool = False
) -> torch.Tensor:
    """Attention over concatenated sequences, not paged: q [N, Hq, D], k/v [N, Hkv, D], sequence b is
    rows cu_seqlens[b]:[b+1] of all three. Float32 scores and softmax, output in q's dtype."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # [H, n, D]
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        attended = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[start:end] = attended.transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    scale_log2, window,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_kb, stride_kt, stride_kh,  # paged: block, token in block, head; not paged: -, token, head
    stride_vb, stride_vt, stride_vh,
    stride_bt,  # block table row
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    UPCAST: tl.constexpr,  # tl.dot in float32 (the interpreter's bfloat16 dot is wrong)
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    num_rows = num_new * GROUP
    if tile * BLOCK_M >= num_rows:
        return
    if PAGED:
        context_len = tl.load(context_lens_ptr + seq)
        kv_start = 0
    else:  # keys are the sequence's own rows
        context_len = num_new
        kv_start = q_start

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    q_pos = context_len - num_new + token  # [BLOCK_M] position of each row's token in its sequence
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Key range the tile's rows can see: [lo, hi).
    first_pos = context_len - num_new + (tile * BLOCK_M) // GROUP
    last_pos = context_len - num_new + (tl.minimum((tile + 1) * BLOCK_M, num_rows) - 1) // GROUP
    hi = context_len
    if CAUSAL:
        hi = last_pos + 1
    lo = 0
    if WINDOWED:
        lo = tl.maximum(first_pos - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        if PAGED:
            block = tl.load(block_tables_ptr + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
            offset = k_pos % BLOCK_SIZE
            k_off = block * stride_kb + offset * stride_kt
            v_off = block * stride_vb + offset * stride_vt
        else:
            k_off = (kv_start + k_pos).to(tl.int64) * stride_kt
            v_off = (kv_start + k_pos).to(tl.int64) * stride_vt
        load_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + k_off[:, None] + kv_head * stride_kh + dims[None, :], mask=load_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_M, BLOCK_N]
        visible = k_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if WINDOWED:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 then, not -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + v_off[:, None] + kv_head * stride_vh + dims[None, :], mask=load_mask, other=0.0)
        p = p.to(v_ptr.dtype.element_ty)  # rounded as the GPU's second tl.dot sees it
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows with no key (empty context) write 0
    tl.store(out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _tiles(head_dim_padded: int, dtype: torch.dtype, block_m: int | None, block_n: int | None
           ) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): see the module docstring for where the defaults come from."""
    if dtype == torch.float32:
        default = (64, 32, 8) if head_dim_padded <= 64 else (32, 16, 8)
    else:
        default = (128, 64, 8) if head_dim_padded <= 64 else (128, 32, 8) if head_dim_padded <= 128 else (64, 16, 8)
    block_m = block_m or default[0]
    block_n = block_n or default[1]
    for value, name in ((block_m, "block_m"), (block_n, "block_n")):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
    return block_m, block_n, default[2]


def _launch(q, k, v, out, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, group, scale, sliding_window,
            paged, causal, block_size, block_m, block_n):
    num_seqs = cu_seqlens_q.shape[0] - 1
    head_dim = q.shape[2]
    block_d = max(16, next_power_of_2(head_dim))
    block_m, block_n, num_warps = _tiles(block_d, q.dtype, block_m, block_n)
    num_kv_heads = q.shape[1] // group
    if max_seqlen_q == 0 or num_seqs == 0 or q.shape[0] == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q * group, block_m), num_seqs, num_kv_heads)
    if paged:
        kb, kt, kh = k.stride(0), k.stride(1), k.stride(2)
        vb, vt, vh = v.stride(0), v.stride(1), v.stride(2)
        stride_bt = block_tables.stride(0)
    else:
        kb, kt, kh = 0, k.stride(0), k.stride(1)
        vb, vt, vh = 0, v.stride(0), v.stride(1)
        stride_bt = 0
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, context_lens, block_tables,
        scale * LOG2_E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kb, kt, kh, vb, vt, vh, stride_bt,
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PAGED=paged, CAUSAL=causal, WINDOWED=sliding_window is not None,
        UPCAST=dot_upcast(_prefill_kernel, q.dtype),
        num_warps=num_warps, num_stages=2,
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of q [N, Hq, D] over the paged cache -> out [N, Hq, D] in q's dtype.

    max_seqlen_q is the host copy of the longest cu_seqlens_q gap (it sizes the grid; rows beyond
    it are not computed). A sliding window applies to causal attention only."""
    group = check_paged(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, sliding_window)
    check_host_int(max_seqlen_q, "max_seqlen_q")
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window needs causal attention (a bidirectional window is not defined here)")
    out = torch.empty_like(q)
    return _launch(q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, group, scale,
                   sliding_window, True, causal, k_cache.shape[1], block_m, block_n)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    *,
    causal: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention over concatenated sequences with no cache (encoders): q [N, Hq, D], k/v [N, Hkv, D],
    sequence b is rows cu_seqlens[b]:[b+1] of all three -> out [N, Hq, D]."""
    check_kv(q, k, v, 3, ("k", "v"))
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has {k.shape[0]} rows, q {q.shape[0]}: both hold the same tokens")
    group = check_heads(q, k.shape[1], k.shape[2], name="k")
    check_index(cu_seqlens, "cu_seqlens", 1, q.device)
    check_host_int(max_seqlen, "max_seqlen")
    check_scale_window(scale, None)
    out = torch.empty_like(q)
    return _launch(q, k, v, out, cu_seqlens, cu_seqlens, cu_seqlens, max_seqlen, group, scale, None,
                   False, causal, 1, block_m, block_n)
