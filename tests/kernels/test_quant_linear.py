"""Weight-only int8/int4 layers (kernels/quant_linear.py) against their torch references, odd shapes."""

from __future__ import annotations

import pytest
import torch

from kernels.quant_linear import (
    Int4Linear, Int8Embedding, Int8Linear, PromptRows, dequantize_int4_ref, dequantize_int8_ref, has_int8_kernel,
    quantize_int4, quantize_int8,
)

SHAPES = [(1, 64, 32), (7, 96, 160), (37, 576, 960), (3, 1536, 576)]  # (rows, in, out)


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_int8_linear_matches_dequantized_reference(rows, k, n):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(rows, k)
    layer = Int8Linear.from_float(weight, bias, torch.float32)
    q, scale = quantize_int8(weight)
    expected = x @ dequantize_int8_ref(q, scale).T + bias
    torch.testing.assert_close(layer(x), expected, atol=1e-3, rtol=1e-4)
    # Per-channel int8 keeps a random matrix within half a step of each row's scale.
    assert (dequantize_int8_ref(q, scale) - weight).abs().max() <= scale.max() / 2 + 1e-6


@pytest.mark.skipif(not has_int8_kernel(), reason="this torch build has no packed int8 kernel: one path only")
def test_int8_rows_take_their_own_path_whatever_the_step_holds():
    """Prompt rows through the bf16 GEMM, generated rows through the packed kernel, each row as it
    would be alone; an unplanned call (and the call after a plan's forward) is all packed."""
    torch.manual_seed(0)
    rows = PromptRows()
    layer = Int8Linear.from_float(torch.randn(96, 64), torch.randn(96), torch.bfloat16, rows)
    x = torch.randn(12, 64).bfloat16()
    packed = Int8Linear.from_float(torch.randn(1, 1), None, torch.bfloat16)  # no plan: a reader of the kernel
    packed.weight_int8, packed.scale, packed.bias = layer.weight_int8, layer.scale, layer.bias
    all_packed = packed(x)
    assert torch.equal(layer(x), all_packed)  # not planned
    # Three sequences: a prompt chunk (rows 0-4), a decode row (5), a recompute of 3 prompt and 3
    # generated tokens (6-11).
    rows.plan([0, 5, 6, 12], [5, 0, 3], x.device)
    assert rows.of(12) == "mixed" and rows.of(7) == "generated"
    mixed = layer(x)
    rows.plan([0, 3], [3], x.device)
    prompt_alone = layer(x[6:9])
    assert torch.equal(mixed[6:9], prompt_alone)
    rows.plan([0, 5], [5], x.device)
    assert torch.equal(mixed[:5], layer(x[:5]))
    for generated in (5, 9, 10, 11):
        assert torch.equal(mixed[generated], all_packed[generated])
    reference = (x.float() @ dequantize_int8_ref(layer.weight_int8, layer.scale).T + layer.bias.float())
    torch.testing.assert_close(mixed.float(), reference, atol=0.15, rtol=0.02)
    rows.clear()
    assert torch.equal(layer(x), all_packed)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["packed_kernel", "dequantize_per_call"])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_int4_linear_matches_dequantized_reference(rows, k, n, use_kernel):
    torch.manual_seed(1)
    weight, x = torch.randn(n, k), torch.randn(rows, k)
    layer = Int4Linear.from_float(weight, None, torch.float32, use_kernel=use_kernel)
    q, scale, low = quantize_int4(weight)
    expected = x @ dequantize_int4_ref(q, scale, low, 32).T
    torch.testing.assert_close(layer(x), expected, atol=2e-3, rtol=1e-4)
    assert layer.packed.numel() * layer.packed.element_size() == n * k // 2  # half a byte a weight


def test_int4_requantizes_q4_1_blocks_losslessly():
    """A weight dequantized from llama.cpp Q4_1 blocks (q * d + m, both ends of 0..15 taken) comes back as
    the same codes: load-time int4 of a Q4_1 GGUF adds no error of its own."""
    torch.manual_seed(2)
    n, k = 48, 128
    codes = torch.randint(0, 16, (n, k))
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # Q4_1 puts each block's min at 0 and max at 15
    d, m = torch.rand(n, k // 32) * 0.1 + 0.01, torch.randn(n, k // 32)
    weight = dequantize_int4_ref(codes, d, m, 32)
    q, scale, low = quantize_int4(weight)
    assert torch.equal(q, codes.to(torch.int32))
    torch.testing.assert_close(dequantize_int4_ref(q, scale, low, 32), weight, atol=1e-6, rtol=0)


def test_int8_embedding_reads_the_head_rows():
    torch.manual_seed(3)
    weight = torch.randn(50, 16)
    head = Int8Linear.from_float(weight, None, torch.float32)
    embedding = Int8Embedding(head)
    ids = torch.tensor([0, 7, 49, 7])
    torch.testing.assert_close(embedding(ids), dequantize_int8_ref(head.weight_int8, head.scale)[ids])
    assert embedding.weight_int8 is head.weight_int8


def test_int4_refuses_in_features_off_the_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(8, 40))
