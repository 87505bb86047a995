"""The paged decode kernel, single-pass and split-KV, equals the paged attention reference.

Runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py): few heads, small head dims.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention_ref import paged_attention_ref
from kernels.decode_attention import choose_num_splits, paged_decode_attention
from tests.kernels.attention_cases import assert_close, make_step

# Context lengths around block (16) and tile boundaries, a 2k one, and one token.
CONTEXTS = [1, 2, 15, 16, 17, 100, 513, 2048]


def decode(q, k_cache, v_cache, metadata, scale, **kwargs):
    return paged_decode_attention(q, k_cache, v_cache, metadata.cu_seqlens_q, metadata.context_lens,
                                  metadata.block_tables, metadata.max_context_len, scale, **kwargs)


def decode_step(contexts, num_heads, num_kv_heads, **kwargs):
    return make_step([(1, ctx) for ctx in contexts], num_heads, num_kv_heads, **kwargs)


@pytest.mark.parametrize("num_splits", [1, None])
def test_contexts_from_1_to_2k_tokens(num_splits):
    q, k, v, md = decode_step(CONTEXTS, 4, 1)
    assert_close(decode(q, k, v, md, 0.25, num_splits=num_splits), paged_attention_ref(q, k, v, md, 0.25))


@pytest.mark.parametrize("group, block_size", [(1, 16), (4, 32), (8, 16), (8, 32)])
def test_gqa_groups_and_block_sizes(group, block_size):
    q, k, v, md = decode_step([3, 40, 64, 97, 33], 2 * group, 2, block_size=block_size, seed=group)
    assert_close(decode(q, k, v, md, 0.3, block_n=16), paged_attention_ref(q, k, v, md, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_per_dtype(dtype, num_splits):
    q, k, v, md = decode_step([5, 70, 200], 4, 2, head_dim=32, dtype=dtype)
    out = decode(q, k, v, md, 32**-0.5, num_splits=num_splits, block_n=16)
    assert_close(out, paged_attention_ref(q, k, v, md, 32**-0.5))


@pytest.mark.parametrize("head_dim", [17, 40, 80, 96])
def test_head_dims_not_a_power_of_two(head_dim):
    q, k, v, md = decode_step([9, 50, 130], 4, 2, head_dim=head_dim)
    scale = head_dim**-0.5
    assert_close(decode(q, k, v, md, scale, num_splits=2), paged_attention_ref(q, k, v, md, scale))


@pytest.mark.parametrize("window", [1, 7, 100, 5000])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_sliding_window(window, num_splits):
    q, k, v, md = decode_step([3, 50, 300], 2, 1)
    out = decode(q, k, v, md, 0.25, sliding_window=window, num_splits=num_splits, block_n=16)
    assert_close(out, paged_attention_ref(q, k, v, md, 0.25, sliding_window=window))


@pytest.mark.parametrize("num_splits", [2, 3, 7, 32])
def test_split_kv_equals_single_pass(num_splits):
    # Short sequences beside a long one: most of their partitions are empty.
    q, k, v, md = decode_step([1, 20, 47, 600], 8, 2)
    single = decode(q, k, v, md, 0.25, num_splits=1, block_n=16)
    split = decode(q, k, v, md, 0.25, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(split, single, atol=1e-6, rtol=1e-6)


def test_max_context_len_above_the_true_maximum_is_still_correct():
    # A CUDA graph captured for a longer context replays with the grid it was captured with.
    q, k, v, md = decode_step([5, 90], 2, 1)
    out = paged_decode_attention(q, k, v, md.cu_seqlens_q, md.context_lens, md.block_tables, 1000, 0.25,
                                 num_splits=8, block_n=16)
    assert_close(out, paged_attention_ref(q, k, v, md, 0.25))


def test_sequence_without_a_row_this_step_is_skipped():
    q, k, v, md = make_step([(1, 10), (0, 7), (1, 40)], 2, 2)
    assert_close(decode(q, k, v, md, 0.25, num_splits=2), paged_attention_ref(q, k, v, md, 0.25))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_padding_row_with_empty_context_writes_zeros(num_splits):
    # Graph padding rows: context 0 must give 0, not NaN that could leak through later ops.
    q, k, v, md = decode_step([30, 30], 2, 1)
    md.context_lens[1] = 0
    out = decode(q, k, v, md, 0.25, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out[:1], paged_attention_ref(q, k, v, md, 0.25)[:1])


def test_choose_num_splits_fills_the_sms_only_when_the_batch_does_not():
    assert choose_num_splits(64, 8, 4096) == 1  # 512 programs: 2 waves on 132 SMs already
    assert choose_num_splits(1, 8, 4096) == 16  # partitions of 256 keys cap it
    assert choose_num_splits(1, 1, 100_000) == 32  # max_splits
    assert choose_num_splits(1, 8, 200) == 1  # too short to split
    assert choose_num_splits(4, 2, 8192, num_sms=16) == 4  # fewer SMs, fewer splits


BAD_INPUTS = {
    "cache is 3-D": (lambda q, k, v: (q, k[0], v[0]), "4 dims"),
    "heads not a multiple": (lambda q, k, v: (q[:, :3], k, v), "multiple of"),
    "float16 q, float32 cache": (lambda q, k, v: (q.half(), k, v), "dtype"),
    "head_dim mismatch": (lambda q, k, v: (q[..., :8].contiguous(), k, v), "head_dim"),
    "integer q": (lambda q, k, v: (q.int(), k.int(), v.int()), "float32, float16 or bfloat16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_them(case):
    q, k, v, md = decode_step([3, 5], 4, 2)
    change, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        decode(*change(q, k, v), md, 0.25)


def test_tensor_max_context_len_is_refused():
    q, k, v, md = decode_step([3, 5], 2, 2)
    with pytest.raises(ValueError, match="Python int"):
        paged_decode_attention(q, k, v, md.cu_seqlens_q, md.context_lens, md.block_tables, md.context_lens.max(),
                               0.25)
