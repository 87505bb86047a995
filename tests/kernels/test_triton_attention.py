"""`paged_attention_triton` keeps the `Ops.paged_attention` contract: equal to the reference on any
step, decode-only steps on the decode kernel, no host sync (on CUDA).

The kernels' own sweeps are in test_triton_attention_prefill.py and test_triton_attention_decode.py.
"""

from __future__ import annotations

import pytest
import torch

from kernels import attention_triton
from kernels.attention_ref import paged_attention_ref
from kernels.attention_triton import paged_attention_triton
from tests.kernels.attention_cases import assert_close, make_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the kernels for a CUDA device")

STEPS = {
    "decode only": [(1, 1), (1, 300), (1, 17), (1, 64)],
    "mixed: chunk over a prefix, prompts, decodes": [(6, 50), (1, 9), (20, 20), (1, 1), (3, 3), (1, 120)],
    "one prompt": [(33, 33)],
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("sliding_window", [None, 16])
def test_matches_reference(step, sliding_window):
    q, k, v, md = make_step(STEPS[step], 8, 2, head_dim=24)
    out = paged_attention_triton(q, k, v, md, 0.2, sliding_window)
    assert_close(out, paged_attention_ref(q, k, v, md, 0.2, sliding_window))
    assert md.backend_plan is None  # other backends' plans are theirs: neither read nor written


@pytest.mark.parametrize("step, kernel", [("decode only", "paged_decode_attention"),
                                          ("mixed: chunk over a prefix, prompts, decodes", "paged_prefill_attention")])
def test_chooses_the_kernel_from_max_seqlen_q(monkeypatch, step, kernel):
    calls = []
    original = getattr(attention_triton, kernel)
    monkeypatch.setattr(attention_triton, kernel, lambda *a, **kw: calls.append(kernel) or original(*a, **kw))
    q, k, v, md = make_step(STEPS[step], 2, 1)
    paged_attention_triton(q, k, v, md, 0.25)
    assert calls == [kernel]


@pytest.mark.parametrize("step", ["decode only", "mixed: chunk over a prefix, prompts, decodes"])
def test_strided_views_are_read_through_their_strides(step):
    # q sliced out of a fused qkv projection, k/v caches out of one [num_blocks, 2, ...] pool.
    q, k, v, md = make_step(STEPS[step], 4, 2)
    qkv = torch.cat([q, torch.randn(q.shape[0], 4, q.shape[2])], dim=1)  # [N, Hq + 2 Hkv, D]
    pool = torch.stack([k, v], dim=1)  # [num_blocks, 2, block_size, Hkv, D]
    out = paged_attention_triton(qkv[:, :4], pool[:, 0], pool[:, 1], md, 0.25)
    assert_close(out, paged_attention_ref(q, k, v, md, 0.25))


def test_tensor_max_seqlen_q_is_refused():
    q, k, v, md = make_step(STEPS["one prompt"], 2, 1)
    md.max_seqlen_q = torch.tensor(33)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        paged_attention_triton(q, k, v, md, 0.25)


def _cuda_step(seq_shapes, dtype=torch.bfloat16):
    q, k, v, md = make_step(seq_shapes, 32, 8, head_dim=128, block_size=16, dtype=dtype)
    md.cu_seqlens_q, md.context_lens, md.block_tables = (
        t.cuda() for t in (md.cu_seqlens_q, md.context_lens, md.block_tables))
    return q.cuda(), k.cuda(), v.cuda(), md


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_llama_8b_head_shapes_on_cuda(dtype):
    steps = [[(1, 1 + 97 * i) for i in range(64)], [(512, 2048), (1, 4000), (300, 300)] + [(1, 700)] * 8]
    for shapes in steps:
        q, k, v, md = _cuda_step(shapes, dtype)
        assert_close(paged_attention_triton(q, k, v, md, 128**-0.5), paged_attention_ref(q, k, v, md, 128**-0.5))


@pytest.mark.gpu
@needs_cuda
def test_no_host_sync_on_cuda():
    decode_step = _cuda_step([(1, 1000)] * 4)
    mixed_step = _cuda_step([(64, 256), (1, 900)])
    for q, k, v, md in (decode_step, mixed_step):
        paged_attention_triton(q, k, v, md, 128**-0.5)  # compile first: compilation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            paged_attention_triton(q, k, v, md, 128**-0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
