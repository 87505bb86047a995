"""The elementwise Triton kernels equal their torch references (the spec) on odd shapes and dtypes.

RMSNorm and LayerNorm with the residual add, rotary embedding (neox and GPT-J layouts, scaled
caches), SiLU/GELU-and-mul and the KV-cache write. Without CUDA they run under triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small but
odd. Tolerances are per dtype; bfloat16's is wider than one rounding because the interpreter
converts float32 to bfloat16 by truncation (triton 3.9's `cast_impl`), where a GPU rounds to
nearest: results may sit up to one bfloat16 ulp further off at each rounding step.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kernels.activation import (gelu_and_mul_ref, gelu_and_mul_triton, gelu_tanh_and_mul_ref, silu_and_mul_ref,
                                silu_and_mul_triton)
from kernels.kv_write import write_kv_ref, write_kv_triton
from kernels.layernorm import layernorm_ref, layernorm_triton
from kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton
from kernels.rope import build_cos_sin_cache, rope_gptj_ref, rope_ref, rope_triton
from services.worker.models.hf_config import RopeConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (3e-2, 3e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


# --- RMSNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [72, 200, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(dtype, hidden, with_residual):
    x = randn(5, hidden, dtype=dtype, scale=3.0)
    weight = randn(hidden, dtype=dtype, seed=1)
    residual = randn(5, hidden, dtype=dtype, seed=2) if with_residual else None
    normed, summed = rmsnorm_triton(x, weight, 1e-6, residual)
    expected_normed, expected_sum = rmsnorm_ref(x, weight, 1e-6, residual)
    assert_close(normed, expected_normed)
    assert_close(summed, expected_sum)


def test_rmsnorm_reads_strided_rows_and_promotes_with_a_float32_weight():
    wide = randn(4, 200 + 24, dtype=torch.bfloat16)
    x, residual = wide[:, :200], randn(4, 224, dtype=torch.bfloat16, seed=3)[:, 24:]
    weight = randn(200, seed=1)  # float32 weight: the reference's product is float32
    normed, summed = rmsnorm_triton(x, weight, 1e-5, residual)
    expected_normed, expected_sum = rmsnorm_ref(x, weight, 1e-5, residual)
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, expected_normed, atol=3e-2, rtol=3e-2)
    assert_close(summed, expected_sum)


def test_rmsnorm_rejects_a_weight_of_the_wrong_size():
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_triton(randn(2, 72), randn(64), 1e-6)


# --- LayerNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [72, 200, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_matches_reference(dtype, hidden, with_residual):
    x = randn(5, hidden, dtype=dtype, scale=3.0) + 1.5  # an offset mean, so centring matters
    weight, bias = randn(hidden, dtype=dtype, seed=1), randn(hidden, dtype=dtype, seed=4)
    residual = randn(5, hidden, dtype=dtype, seed=2) if with_residual else None
    normed, summed = layernorm_triton(x, weight, bias, 1e-12, residual)
    expected_normed, expected_sum = layernorm_ref(x, weight, bias, 1e-12, residual)
    assert_close(normed, expected_normed)
    assert_close(summed, expected_sum)


def test_layernorm_post_norm_skips_the_sum_and_equals_torch_layernorm_of_the_sum():
    """BERT's `LayerNorm(hidden + sublayer_out)` without writing the sum; no weight or bias works too."""
    hidden, sublayer_out = randn(3, 200, dtype=torch.float16), randn(3, 200, dtype=torch.float16, seed=5)
    norm = torch.nn.LayerNorm(200, eps=1e-12).to(DEVICE, torch.float16)
    with torch.no_grad():
        norm.weight.copy_(randn(200, dtype=torch.float16, seed=1))
        norm.bias.copy_(randn(200, dtype=torch.float16, seed=4))
        expected = norm(hidden + sublayer_out)  # bert.py's order; float addition commutes
    normed, summed = layernorm_triton(sublayer_out, norm.weight, norm.bias, 1e-12, hidden, keep_sum=False)
    assert summed is None
    assert_close(normed, expected)
    plain, _ = layernorm_triton(hidden, None, None, 1e-5)
    assert_close(plain, torch.nn.functional.layer_norm(hidden, (200,), eps=1e-5))


# --- Rotary embedding ------------------------------------------------------------------------


def default_cache(head_dim: int, max_positions: int = 64) -> torch.Tensor:
    return build_cos_sin_cache(RopeConfig(theta=10000.0).inv_freq(head_dim), max_positions).to(DEVICE)


def fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """q and k as views of one [N, (Hq + 2 Hkv) * D] projection output, as the model slices it."""
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("heads,head_dim", [((1, 1), 64), ((3, 1), 80), ((9, 3), 128), ((8, 1), 40)])
def test_rope_rotates_fused_qkv_views_in_place(dtype, is_neox, heads, head_dim):
    num_heads, num_kv_heads = heads
    qkv, q, k = fused_qkv(4, num_heads, num_kv_heads, head_dim, dtype)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 37, 5, 63], device=DEVICE)
    cache = default_cache(head_dim)
    expected_q, expected_k = (rope_ref if is_neox else rope_gptj_ref)(q, k, positions, cache)
    out_q, out_k = rope_triton(q, k, positions, cache, is_neox=is_neox)
    assert out_q is q and out_k is k
    assert_close(q, expected_q)
    assert_close(k, expected_k)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)  # v is not touched


@pytest.mark.parametrize("scaling", [
    RopeConfig(theta=500000.0, rope_type="linear", factor=4.0),
    RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=64),
], ids=["linear", "llama3"])
def test_rope_uses_a_scaled_cache(scaling):
    head_dim = 64
    inv_freq = scaling.inv_freq(head_dim)
    assert not torch.equal(inv_freq, RopeConfig(theta=500000.0).inv_freq(head_dim))  # the scaling does change it
    cache = build_cos_sin_cache(inv_freq, 512, attention_factor=1.1).to(DEVICE)
    _, q, k = fused_qkv(3, 4, 2, head_dim, torch.float32, seed=6)
    positions = torch.tensor([511, 300, 1], device=DEVICE, dtype=torch.int32)
    expected_q, expected_k = rope_ref(q, k, positions.long(), cache)
    rope_triton(q, k, positions, cache)
    assert_close(q, expected_q)
    assert_close(k, expected_k)


def test_gptj_reference_is_complex_rotation_of_interleaved_pairs():
    """The GPT-J spec itself, against Meta's Llama formulation: pairs (2i, 2i+1) as complex numbers
    multiplied by exp(i * position * inv_freq_i); and the layouts differ, so neither can stand in."""
    head_dim, positions = 40, torch.tensor([3, 17])
    inv_freq = RopeConfig(theta=10000.0).inv_freq(head_dim)
    q, k = torch.randn(2, 3, head_dim), torch.randn(2, 1, head_dim)
    rotation = torch.polar(torch.ones(2, head_dim // 2), torch.outer(positions.float(), inv_freq))[:, None, :]
    expected_q = torch.view_as_real(torch.view_as_complex(q.view(2, 3, -1, 2)) * rotation).flatten(-2)
    got_q, _ = rope_gptj_ref(q, k, positions, build_cos_sin_cache(inv_freq, 32))
    torch.testing.assert_close(got_q, expected_q, atol=1e-5, rtol=1e-5)
    neox_q, _ = rope_ref(q, k, positions, build_cos_sin_cache(inv_freq, 32))
    assert (neox_q - got_q).abs().max() > 0.1


def test_rope_rejects_a_cache_of_another_head_dim():
    _, q, k = fused_qkv(2, 2, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rope_triton(q, k, torch.tensor([0, 1], device=DEVICE), default_cache(128))


# --- Gated activations -----------------------------------------------------------------------

ACTIVATIONS = {
    "silu": (silu_and_mul_triton, silu_and_mul_ref),
    "gelu_tanh": (lambda x: gelu_and_mul_triton(x, approximate="tanh"), gelu_tanh_and_mul_ref),
    "gelu_erf": (lambda x: gelu_and_mul_triton(x, approximate="none"), gelu_and_mul_ref),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("intermediate", [72, 1100])  # 1100: more than one 1024-column program per row
def test_gated_activation_matches_reference(dtype, activation, intermediate):
    kernel, reference = ACTIVATIONS[activation]
    x = randn(3, 2 * intermediate, dtype=dtype, scale=4.0)  # |x| up to ~15: the saturated tails too
    with warnings.catch_warnings():  # numpy's exp overflows to inf in the interpreter's sigmoid: 1/(1+inf) = 0
        warnings.simplefilter("ignore", RuntimeWarning)
        out = kernel(x)
    assert_close(out, reference(x))


def test_gated_activation_reads_strided_rows():
    wide = randn(4, 2 * 72 + 16, dtype=torch.float16)
    x = wide[:, 16:]
    assert not x.is_contiguous()
    assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x))


def test_gated_activation_rejects_an_odd_width():
    with pytest.raises(ValueError, match="gate"):
        silu_and_mul_triton(randn(2, 7))
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul_triton(randn(2, 8), approximate="sigmoid")


# --- KV-cache write --------------------------------------------------------------------------


@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads,head_dim", [(1, 64), (3, 80), (2, 128), (4, 40)])
def test_write_kv_matches_reference_and_skips_padding(cache_dtype, block_size, kv_heads, head_dim):
    num_heads = 2 * kv_heads
    qkv, _, k = fused_qkv(6, num_heads, kv_heads, head_dim, torch.float16, seed=7)
    v = qkv[:, (num_heads + kv_heads) * head_dim :].view(6, kv_heads, head_dim)
    num_blocks = 4
    k_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype, seed=8)
    v_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype, seed=9)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    last = num_blocks * block_size - 1
    slot_mapping = torch.tensor([block_size + 3, -1, last, 0, -1, 2 * block_size], device=DEVICE)
    write_kv_ref(k, v, expected_k, expected_v, slot_mapping)
    write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    assert_close(k_cache, expected_k)
    assert_close(v_cache, expected_v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[[block_size + 3, last, 0, 2 * block_size]] = False
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[untouched.to(DEVICE)],
                       randn(num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype, seed=8)
                       .view(-1, kv_heads, head_dim)[untouched.to(DEVICE)])


def test_write_kv_takes_int32_slots():
    k, v = randn(3, 2, 64), randn(3, 2, 64, seed=1)
    k_cache, v_cache = torch.zeros(2, 16, 2, 64, device=DEVICE), torch.zeros(2, 16, 2, 64, device=DEVICE)
    write_kv_triton(k, v, k_cache, v_cache, torch.tensor([31, -1, 4], dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache[1, 15], k[0]) and torch.equal(v_cache[0, 4], v[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2  # two slots written, the padding row nowhere


def test_write_kv_with_only_padding_writes_nothing():
    k = randn(3, 2, 64)
    k_cache, v_cache = torch.zeros(2, 16, 2, 64, device=DEVICE), torch.zeros(2, 16, 2, 64, device=DEVICE)
    write_kv_triton(k, k, k_cache, v_cache, torch.full((3,), -1, device=DEVICE))
    assert not k_cache.any() and not v_cache.any()


def test_write_kv_rejects_a_cache_of_another_head_dim():
    k = randn(2, 2, 64)
    cache = torch.zeros(2, 16, 2, 80, device=DEVICE)
    with pytest.raises(ValueError, match="k_cache"):
        write_kv_triton(k, k, cache, cache, torch.tensor([0, 1], device=DEVICE))
