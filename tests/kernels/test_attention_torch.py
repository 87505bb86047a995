"""The torch backend's batched paged attention equals the reference (the spec) on odd shapes."""

from __future__ import annotations

import pytest
import torch

from kernels.attention_ref import paged_attention_ref
from kernels.attention_torch import paged_attention_torch
from kernels.ops import AttentionMetadata


def make_case(seq_shapes, num_heads, num_kv_heads, head_dim=16, block_size=4, seed=0, dtype=torch.float32):
    """seq_shapes: [(num_new, context_len)] per sequence; blocks are a random permutation."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seq_shapes]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, taken = [], 0
    for n in blocks_per_seq:
        tables.append(order[taken : taken + n])
        taken += n
    max_blocks = max(blocks_per_seq)
    block_tables = torch.zeros(len(seq_shapes), max_blocks, dtype=torch.int32)
    for b, table in enumerate(tables):
        block_tables[b, : len(table)] = torch.tensor(table)
    cu = [0]
    for num_new, _ in seq_shapes:
        cu.append(cu[-1] + num_new)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=generator).to(dtype)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor([ctx for _, ctx in seq_shapes], dtype=torch.int32),
        block_tables=block_tables,
        max_seqlen_q=max(n for n, _ in seq_shapes),
        max_context_len=max(ctx for _, ctx in seq_shapes),
    )
    return q, k_cache, v_cache, metadata


CASES = {
    "decode only": [(1, 1), (1, 7), (1, 33), (1, 16)],
    "prefill only": [(5, 5), (13, 13)],
    "chunked prefill after a cached prefix": [(6, 17), (3, 9)],
    "mixed": [(1, 40), (9, 9), (1, 3), (4, 22), (1, 1)],
    "one long decode among short": [(1, 2), (1, 97), (1, 5)],
    # Enough decode rows to be split into length groups, in an order that is not sorted by length.
    "many decodes of mixed lengths": [(1, (7 * i) % 61 + 1) for i in range(37)],
    "many decodes beside a prefill": [(1, (5 * i) % 29 + 1) for i in range(20)] + [(7, 12)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_matches_reference(case, heads, sliding_window):
    num_heads, num_kv_heads = heads
    q, k_cache, v_cache, metadata = make_case(CASES[case], num_heads, num_kv_heads)
    scale = 16**-0.5
    want = paged_attention_ref(q, k_cache, v_cache, metadata, scale, sliding_window)
    got = paged_attention_torch(q, k_cache, v_cache, metadata, scale, sliding_window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_reference_within_bf16_tolerance():
    q, k_cache, v_cache, metadata = make_case(CASES["mixed"], 6, 2, dtype=torch.bfloat16)
    want = paged_attention_ref(q, k_cache, v_cache, metadata, 0.25)
    got = paged_attention_torch(q, k_cache, v_cache, metadata, 0.25)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_rows_of_empty_sequences_are_left_alone():
    q, k_cache, v_cache, metadata = make_case([(1, 4), (2, 6)], 4, 2)
    # A sequence scheduled with no new tokens this step owns no query rows.
    metadata.cu_seqlens_q = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    metadata.context_lens = torch.tensor([4, 5, 6], dtype=torch.int32)
    metadata.block_tables = torch.cat([metadata.block_tables[:1], metadata.block_tables[:1], metadata.block_tables[1:]])
    want = paged_attention_ref(q, k_cache, v_cache, metadata, 0.25)
    got = paged_attention_torch(q, k_cache, v_cache, metadata, 0.25)
    torch.testing.assert_close(got, want)
