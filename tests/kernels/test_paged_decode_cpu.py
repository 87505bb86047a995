"""The compiled CPU paged decode kernel equals the reference (the spec) on odd shapes.

Tolerances: float32 atol = rtol = 1e-5 (observed ~2e-6: the kernel's exp2 polynomial and its
summation order differ from torch's softmax); bfloat16 atol = rtol = 1.6e-2, one bfloat16 ulp
(both sides read the same bfloat16 cache and accumulate in float32; they differ by the rounding of
the output); float16 atol = rtol = 2e-3 on the same grounds.
"""

from __future__ import annotations

import pytest
import torch

from kernels import paged_decode_cpu
from kernels.attention_ref import paged_attention_ref
from kernels.attention_torch import paged_attention_cpu, paged_attention_torch
from kernels.ops import AttentionMetadata

OP = paged_decode_cpu.load(build=True)  # compiles on first use where scripts/setup has not (~20 s)
if OP is None:
    pytest.skip(f"the CPU decode kernel cannot be built here: {paged_decode_cpu.unavailable_reason()}",
                allow_module_level=True)

TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
              torch.float16: dict(atol=2e-3, rtol=2e-3)}
SAMPLED_LENGTHS = [1, 15, 16, 17, 255, 1000, 2047]


def mixed_lengths(num_rows: int) -> list[int]:
    """37 rows: every sampled length, and lengths of 1..300 in between, in no sorted order."""
    return [SAMPLED_LENGTHS[i // 2 % 7] if i % 2 == 0 else (i * 53) % 300 + 1 for i in range(num_rows)]


def make_case(seq_shapes, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """seq_shapes: [(num_new, context_len)]. Blocks are a random permutation of a pool with spare
    blocks; the caches are one layer's views of a [layers, 2, ...] pool as the engine allocates them;
    q is a slice of a wider qkv row as the model produces it (not contiguous)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seq_shapes]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(blocks_per_seq) + 2  # padded wider than needed: padding must never be read
    block_tables = torch.zeros(len(seq_shapes), max_blocks, dtype=torch.int32)
    taken = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(order[taken : taken + n], dtype=torch.int32)
        taken += n
    pool = torch.randn(2, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    k_cache, v_cache = pool[1, 0], pool[1, 1]
    cu = [0]
    for num_new, _ in seq_shapes:
        cu.append(cu[-1] + num_new)
    qkv = torch.randn(cu[-1], (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor([ctx for _, ctx in seq_shapes], dtype=torch.int32),
        block_tables=block_tables,
        max_seqlen_q=max(n for n, _ in seq_shapes),
        max_context_len=max(ctx for _, ctx in seq_shapes),
    )
    return q, k_cache, v_cache, metadata


def run_kernel(q, k_cache, v_cache, metadata, scale, sliding_window=None, block_tables=None):
    """The kernel over every row (all decode rows), into an output pre-filled with NaN."""
    num_rows = q.shape[0]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    paged_decode_cpu.paged_decode_cpu(
        OP, out, q, k_cache, v_cache, metadata.block_tables if block_tables is None else block_tables,
        metadata.context_lens, torch.arange(num_rows, dtype=torch.int32), metadata.cu_seqlens_q[:-1].long(),
        scale, sliding_window)
    return out


def assert_matches_reference(got, q, k_cache, v_cache, metadata, scale, sliding_window=None):
    want = paged_attention_ref(q, k_cache, v_cache, metadata, scale, sliding_window)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [16, 32, 7])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2), (16, 2)], ids=["gqa1", "gqa3", "gqa4", "gqa8"])
def test_37_rows_of_mixed_lengths_match_the_reference(heads, block_size, dtype):
    num_heads, num_kv_heads = heads
    case = make_case([(1, n) for n in mixed_lengths(37)], num_heads, num_kv_heads, 64, block_size, dtype)
    assert_matches_reference(run_kernel(*case, 0.125), *case, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [128, 40, 17])
def test_head_dims_other_than_64_match_the_reference(head_dim, dtype):
    case = make_case([(1, n) for n in SAMPLED_LENGTHS], 6, 2, head_dim, 16, dtype, seed=head_dim)
    assert_matches_reference(run_kernel(*case, head_dim**-0.5), *case, head_dim**-0.5)


@pytest.mark.parametrize("q_dtype, cache_dtype", [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
                         ids=["float16", "float32-q-bfloat16-cache"])
def test_float16_and_mixed_dtypes_match_the_reference(q_dtype, cache_dtype):
    q, k_cache, v_cache, metadata = make_case([(1, n) for n in mixed_lengths(37)], 9, 3, 64, 16, cache_dtype)
    q = q.to(q_dtype)
    got = run_kernel(q, k_cache, v_cache, metadata, 0.125)
    assert got.dtype == q_dtype
    want = paged_attention_ref(q, k_cache, v_cache, metadata, 0.125)  # the reference reads the cache as float32
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[cache_dtype])


@pytest.mark.parametrize("context_len", SAMPLED_LENGTHS)
def test_each_sampled_length_alone_matches_the_reference(context_len):
    case = make_case([(1, context_len)], 9, 3, 64, 16, seed=context_len)
    assert_matches_reference(run_kernel(*case, 0.125), *case, 0.125)


@pytest.mark.parametrize("window", [1, 5, 16, 300])
def test_sliding_window_keeps_the_window_most_recent_keys(window):
    case = make_case([(1, n) for n in mixed_lengths(37)], 8, 2, 64, 16, seed=window)
    assert_matches_reference(run_kernel(*case, 0.125, sliding_window=window), *case, 0.125, window)


def test_block_tables_in_any_layout_give_the_same_result():
    q, k_cache, v_cache, metadata = make_case([(1, n) for n in mixed_lengths(37)], 9, 3, 64, 16)
    want = run_kernel(q, k_cache, v_cache, metadata, 0.125)
    column_major = metadata.block_tables.t().contiguous().t()  # strides (1, B): converted by the launcher
    wider = torch.zeros(metadata.block_tables.shape[0], metadata.block_tables.shape[1] + 10, dtype=torch.int32)
    wider[:, 3 : 3 + metadata.block_tables.shape[1]] = metadata.block_tables
    offset_view = wider[:, 3 : 3 + metadata.block_tables.shape[1]]  # a wider row stride: read in place
    as_int64 = metadata.block_tables.long()
    for tables in (column_major, offset_view, as_int64):
        assert torch.equal(run_kernel(q, k_cache, v_cache, metadata, 0.125, block_tables=tables), want)


def test_sequences_sharing_prefix_blocks_read_them_in_place():
    q, k_cache, v_cache, metadata = make_case([(1, 70), (1, 70), (1, 50)], 6, 2, 64, 16)
    metadata.block_tables[1, :3] = metadata.block_tables[0, :3]  # a cached prefix of 3 full blocks
    metadata.block_tables[2, :2] = metadata.block_tables[0, :2]
    assert_matches_reference(run_kernel(q, k_cache, v_cache, metadata, 0.125), q, k_cache, v_cache, metadata, 0.125)


def test_only_the_named_rows_are_written():
    q, k_cache, v_cache, metadata = make_case([(1, 5), (1, 40), (1, 9), (1, 33)], 4, 2, 64, 16)
    out = torch.full(q.shape, float("nan"))
    rows = torch.tensor([3, 1])
    paged_decode_cpu.paged_decode_cpu(OP, out, q, k_cache, v_cache, metadata.block_tables, metadata.context_lens,
                                      rows.int(), rows, 0.125, None)
    want = paged_attention_ref(q, k_cache, v_cache, metadata, 0.125)
    torch.testing.assert_close(out[rows], want[rows], **TOLERANCES[torch.float32])
    assert out[[0, 2]].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_backend_sends_decode_rows_to_the_kernel_and_prefill_to_torch(dtype, sliding_window):
    shapes = [(1, n) for n in mixed_lengths(20)] + [(9, 9), (5, 40), (1, 3)]  # decodes, prefills, chunked
    q, k_cache, v_cache, metadata = make_case(shapes, 9, 3, 64, 16, dtype)
    got = paged_attention_cpu(q, k_cache, v_cache, metadata, 0.125, sliding_window)
    assert metadata.backend_plan.kernel_decode is not None
    assert_matches_reference(got, q, k_cache, v_cache, metadata, 0.125, sliding_window)
    # The same step through the torch path re-plans, and agrees.
    fallback = paged_attention_torch(q, k_cache, v_cache, metadata, 0.125, sliding_window)
    torch.testing.assert_close(got.float(), fallback.float(), **TOLERANCES[dtype])


def test_backend_takes_the_torch_path_for_inputs_the_kernel_does_not_take():
    q, k_cache, v_cache, metadata = make_case([(1, 20), (1, 7)], 4, 2, 64, 16, dtype=torch.float64)
    got = paged_attention_cpu(q, k_cache, v_cache, metadata, 0.125)
    assert metadata.backend_plan.kernel_decode is None
    # The reference computes in float32 whatever the input dtype.
    want = paged_attention_ref(q, k_cache, v_cache, metadata, 0.125)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_mismatched_shapes_are_refused_with_a_message():
    q, k_cache, v_cache, metadata = make_case([(1, 20)], 4, 2, 64, 16)
    rows = torch.tensor([0])
    with pytest.raises(RuntimeError, match="head"):
        paged_decode_cpu.paged_decode_cpu(OP, torch.empty(1, 4, 32), q, k_cache, v_cache, metadata.block_tables,
                                          metadata.context_lens, rows.int(), rows, 0.125, None)
    with pytest.raises(RuntimeError, match="dtype"):
        paged_decode_cpu.paged_decode_cpu(OP, torch.empty_like(q), q, k_cache, v_cache.double(),
                                          metadata.block_tables, metadata.context_lens, rows.int(), rows, 0.125, None)


def test_out_of_range_indices_are_refused_not_read():
    q, k_cache, v_cache, metadata = make_case([(1, 20), (1, 40)], 4, 2, 64, 16)
    rows = torch.tensor([0, 1])

    def call(block_tables=metadata.block_tables, context_lens=metadata.context_lens, seq_ids=rows.int(), q_rows=rows):
        paged_decode_cpu.paged_decode_cpu(OP, torch.empty_like(q), q, k_cache, v_cache, block_tables, context_lens,
                                          seq_ids, q_rows, 0.125, None)

    bad_table = metadata.block_tables.clone()
    bad_table[1, 2] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match="block id"):
        call(block_tables=bad_table)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        call(context_lens=torch.tensor([20, 10_000], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seq_ids"):
        call(seq_ids=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="q_rows"):
        call(q_rows=torch.tensor([0, 5]))
