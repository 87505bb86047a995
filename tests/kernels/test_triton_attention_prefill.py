"""The varlen prefill kernel equals the paged attention reference (the spec) on odd shapes.

Runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py), so shapes are small: few heads,
small head dims, tiles of 16 where a case needs several tiles at short lengths.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention_ref import paged_attention_ref
from kernels.prefill_attention import paged_prefill_attention, varlen_attention, varlen_attention_ref
from tests.kernels.attention_cases import assert_close, gather_context, make_step

# A chunk over a cached prefix, whole prompts and decode rows in one step.
MIXED = [(7, 40), (23, 23), (1, 1), (1, 70), (12, 100), (1, 33), (2, 2)]


def prefill(q, k_cache, v_cache, metadata, scale, **kwargs):
    return paged_prefill_attention(q, k_cache, v_cache, metadata.cu_seqlens_q, metadata.context_lens,
                                   metadata.block_tables, metadata.max_seqlen_q, scale, **kwargs)


def test_whole_prompts_with_default_tiles():
    q, k, v, md = make_step([(1, 1), (2, 2), (17, 17), (64, 64), (65, 65), (130, 130)], 2, 1, head_dim=16)
    assert_close(prefill(q, k, v, md, 0.25), paged_attention_ref(q, k, v, md, 0.25))


def test_whole_prompt_of_2k_tokens():
    # Tiles of 128 keep the interpreter's program count down; the masking is the same at any tile.
    q, k, v, md = make_step([(2000, 2000), (3, 3)], 1, 1, head_dim=16, block_size=32)
    assert_close(prefill(q, k, v, md, 0.25, block_m=128, block_n=128), paged_attention_ref(q, k, v, md, 0.25))


def test_chunk_over_a_long_cached_prefix():
    q, k, v, md = make_step([(40, 1900), (3, 5)], 2, 1, head_dim=16, block_size=32)
    assert_close(prefill(q, k, v, md, 0.25, block_m=32), paged_attention_ref(q, k, v, md, 0.25))


@pytest.mark.parametrize("group, block_size", [(1, 16), (4, 32), (8, 16), (8, 32)])
def test_mixed_step_with_gqa(group, block_size):
    q, k, v, md = make_step(MIXED, 2 * group, 2, block_size=block_size, seed=group)
    out = prefill(q, k, v, md, 0.3, block_m=16, block_n=16)
    assert_close(out, paged_attention_ref(q, k, v, md, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_step_per_dtype(dtype):
    q, k, v, md = make_step(MIXED, 4, 2, head_dim=32, dtype=dtype)
    assert_close(prefill(q, k, v, md, 32**-0.5, block_m=16, block_n=16), paged_attention_ref(q, k, v, md, 32**-0.5))


@pytest.mark.parametrize("head_dim", [17, 40, 80, 96])
def test_head_dims_not_a_power_of_two(head_dim):
    q, k, v, md = make_step([(9, 30), (20, 20), (1, 17)], 2, 1, head_dim=head_dim)
    scale = head_dim**-0.5
    assert_close(prefill(q, k, v, md, scale, block_m=16, block_n=16), paged_attention_ref(q, k, v, md, scale))


@pytest.mark.parametrize("window", [1, 7, 40, 500])
def test_sliding_window(window):
    q, k, v, md = make_step([(20, 60), (35, 35), (1, 50), (1, 3)], 4, 2)
    out = prefill(q, k, v, md, 0.25, sliding_window=window, block_m=16, block_n=16)
    assert_close(out, paged_attention_ref(q, k, v, md, 0.25, sliding_window=window))


def test_bidirectional_every_query_sees_the_whole_context():
    q, k, v, md = make_step([(5, 30), (18, 18), (1, 9)], 4, 2)
    out = prefill(q, k, v, md, 0.25, causal=False, block_m=16, block_n=16)
    cu = md.cu_seqlens_q.tolist()
    for b in range(3):
        keys = gather_context(k, md, b).repeat_interleave(2, dim=1).transpose(0, 1)  # [H, L, D]
        values = gather_context(v, md, b).repeat_interleave(2, dim=1).transpose(0, 1)
        queries = q[cu[b] : cu[b + 1]].transpose(0, 1)
        expected = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, scale=0.25)
        assert_close(out[cu[b] : cu[b + 1]], expected.transpose(0, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_without_cache_for_encoders(causal):
    generator = torch.Generator().manual_seed(3)
    cu_seqlens = torch.tensor([0, 1, 19, 52, 60], dtype=torch.int32)
    q = torch.randn(60, 8, 24, generator=generator)
    k, v = torch.randn(2, 60, 2, 24, generator=generator)
    out = varlen_attention(q, k, v, cu_seqlens, 33, 0.2, causal=causal, block_m=16, block_n=16)
    assert_close(out, varlen_attention_ref(q, k, v, cu_seqlens, 0.2, causal=causal))


def test_sequence_without_rows_this_step_is_skipped():
    q, k, v, md = make_step([(4, 10), (0, 7), (3, 3)], 2, 2)
    assert_close(prefill(q, k, v, md, 0.25), paged_attention_ref(q, k, v, md, 0.25))


BAD_INPUTS = {
    "q is 2-D": (lambda q, k, v, md: (q[:, 0], k, v, md, {}), "q must be"),
    "heads not a multiple": (lambda q, k, v, md: (q[:, :3], k, v, md, {}), "multiple of"),
    "dtype mismatch": (lambda q, k, v, md: (q.half(), k, v, md, {}), "dtype"),
    "head_dim mismatch": (lambda q, k, v, md: (q[..., :8], k, v, md, {}), "head_dim"),
    "k/v shapes differ": (lambda q, k, v, md: (q, k, v[:, :8], md, {}), "shape"),
    "float block tables": (lambda q, k, v, md: (q, k, v, md, {"block_tables": md.block_tables.float()}), "int32"),
    "cu_seqlens too short": (lambda q, k, v, md: (q, k, v, md, {"cu_seqlens_q": md.cu_seqlens_q[:-1]}),
                             r"num_seqs \+ 1"),
    "tensor max_seqlen_q": (lambda q, k, v, md: (q, k, v, md, {"max_seqlen_q": torch.tensor(3)}), "Python int"),
    "window with bidirectional": (lambda q, k, v, md: (q, k, v, md, {"causal": False, "sliding_window": 4}), "causal"),
    "zero window": (lambda q, k, v, md: (q, k, v, md, {"sliding_window": 0}), "sliding_window"),
    "negative scale": (lambda q, k, v, md: (q, k, v, md, {"scale": -1.0}), "scale"),
    "tile below 16": (lambda q, k, v, md: (q, k, v, md, {"block_m": 8}), "block_m"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_them(case):
    q, k, v, md = make_step([(3, 5), (2, 2)], 4, 2)
    change, match = BAD_INPUTS[case]
    q, k, v, md, overrides = change(q, k, v, md)
    args = dict(cu_seqlens_q=md.cu_seqlens_q, context_lens=md.context_lens, block_tables=md.block_tables,
                max_seqlen_q=md.max_seqlen_q, scale=0.25)
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(q, k, v, **args)


def test_non_contiguous_head_dim_is_refused():
    q, k, v, md = make_step([(3, 5)], 2, 2, head_dim=16)
    strided = torch.randn(*q.shape[:2], 32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        prefill(strided, k, v, md, 0.25)
