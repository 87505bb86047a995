"""Builders for paged attention cases shared by the Triton attention tests."""

from __future__ import annotations

import torch

from kernels.ops import AttentionMetadata

# (atol, rtol) against the float32 reference: the kernels round probabilities to the input dtype
# before P @ V (as flash-attention does) and the output once more.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_step(seq_shapes, num_heads, num_kv_heads, head_dim=16, block_size=16, dtype=torch.float32, seed=0):
    """seq_shapes: [(num_new, context_len)] per sequence. Each sequence's blocks are a random subset
    of a shuffled pool (never in order, never contiguous); table padding is 0, a real block."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seq_shapes]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables = torch.zeros(len(seq_shapes), max(max(blocks_per_seq), 1), dtype=torch.int32)
    taken = 0
    for b, count in enumerate(blocks_per_seq):
        block_tables[b, :count] = torch.tensor(order[taken : taken + count], dtype=torch.int32)
        taken += count
    cu = [0]
    for num_new, _ in seq_shapes:
        cu.append(cu[-1] + num_new)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
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


def gather_context(cache: torch.Tensor, metadata: AttentionMetadata, b: int) -> torch.Tensor:
    """Sequence b's cached keys or values in order: [context_len, Hkv, D]."""
    context_len = int(metadata.context_lens[b])
    block_size = cache.shape[1]
    blocks = metadata.block_tables[b, : -(-context_len // block_size)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:context_len]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
