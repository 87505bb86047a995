"""Mean pooling (kernels/pooling.py) against its torch reference and sentence-transformers' modules.

Without CUDA the kernel runs under triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from kernels.pooling import mean_pool, mean_pool_ref, mean_pool_varlen, mean_pool_varlen_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are the same numbers in every dtype once widened; only the float32 summation order differs.
TOLERANCE = dict(atol=2e-5, rtol=1e-5)
LENGTHS = [1, 300, 7, 64, 2, 129]


def padded(lengths: list[int], hidden_size: int, dtype: torch.dtype, seed: int = 0):
    """hidden [B, L, H] (padding holds large values, so pooling it would show) and mask [B, L]."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens = max(lengths)
    hidden = torch.randn(len(lengths), num_tokens, hidden_size, generator=generator) + 0.5
    mask = torch.zeros(len(lengths), num_tokens, dtype=torch.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        hidden[row, length:] = 1e4
    return hidden.to(dtype).to(DEVICE), mask.to(DEVICE)


def flat(lengths: list[int], hidden_size: int, dtype: torch.dtype, seed: int = 0):
    """The same sequences back to back: hidden [N, H] and cu_seqlens [B + 1] int32."""
    hidden, mask = padded(lengths, hidden_size, dtype, seed)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return hidden[mask.bool()], cu_seqlens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [384, 200])
@pytest.mark.parametrize("normalize", [False, True])
def test_padded_matches_the_reference(dtype, hidden_size, normalize):
    hidden, mask = padded(LENGTHS, hidden_size, dtype)
    pooled = mean_pool(hidden, mask, normalize=normalize)
    assert pooled.dtype == torch.float32 and pooled.shape == (len(LENGTHS), hidden_size)
    torch.testing.assert_close(pooled, mean_pool_ref(hidden, mask, normalize=normalize), **TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [384, 200])
@pytest.mark.parametrize("normalize", [False, True])
def test_varlen_matches_the_reference(dtype, hidden_size, normalize):
    hidden, cu_seqlens = flat(LENGTHS, hidden_size, dtype)
    pooled = mean_pool_varlen(hidden, cu_seqlens, normalize=normalize)
    torch.testing.assert_close(pooled, mean_pool_varlen_ref(hidden, cu_seqlens, normalize=normalize), **TOLERANCE)


def test_both_layouts_pool_the_same_sequences_alike():
    hidden, mask = padded(LENGTHS, 200, torch.float32, seed=1)
    tokens, cu_seqlens = flat(LENGTHS, 200, torch.float32, seed=1)
    torch.testing.assert_close(mean_pool_varlen(tokens, cu_seqlens.long(), True), mean_pool(hidden, mask, True),
                               **TOLERANCE)
    torch.testing.assert_close(mean_pool_varlen_ref(tokens, cu_seqlens), mean_pool_ref(hidden, mask), **TOLERANCE)


def test_matches_sentence_transformers_pooling_and_normalize():
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    hidden, mask = padded([5, 1, 33], 384, torch.float32, seed=2)
    features = {"token_embeddings": hidden.cpu(), "attention_mask": mask.cpu()}
    expected = Normalize()(Pooling(384, pooling_mode="mean")(features))["sentence_embedding"]
    torch.testing.assert_close(mean_pool(hidden, mask, normalize=True).cpu(), expected, **TOLERANCE)


def test_empty_sequences_pool_to_zeros():
    hidden, cu_seqlens = flat([3, 4], 200, torch.float32)
    cu_seqlens = torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=DEVICE)  # the middle one is empty
    pooled = mean_pool_varlen(hidden, cu_seqlens, normalize=True)
    assert torch.equal(pooled[1], torch.zeros(200, device=DEVICE))
    masked = mean_pool(*padded([2], 200, torch.float32)[:1], torch.zeros(1, 2, dtype=torch.int64, device=DEVICE))
    assert torch.equal(masked, torch.zeros(1, 200, device=DEVICE))


def test_a_slice_of_a_wider_tensor_pools_like_a_copy():
    hidden, mask = padded(LENGTHS, 384, torch.bfloat16, seed=3)
    view = hidden[:, :, 100:300]  # token stride 384, hidden size 200
    torch.testing.assert_close(mean_pool(view, mask), mean_pool(view.contiguous(), mask), atol=0, rtol=0)


def test_cu_seqlens_may_start_past_zero():
    hidden, _ = flat(LENGTHS, 200, torch.float16)
    cu_seqlens = torch.tensor([5, 9, 20], dtype=torch.int64, device=DEVICE)
    torch.testing.assert_close(mean_pool_varlen(hidden, cu_seqlens), mean_pool_varlen_ref(hidden, cu_seqlens),
                               **TOLERANCE)


@pytest.mark.parametrize("call, message", [
    (lambda: mean_pool(torch.zeros(2, 3, 4, dtype=torch.float64), torch.ones(2, 3)), "float32, float16 or bfloat16"),
    (lambda: mean_pool(torch.zeros(2, 3), torch.ones(2, 3)), r"\[B, L, H\]"),
    (lambda: mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4)), "attention_mask must be"),
    (lambda: mean_pool_varlen(torch.zeros(5, 4), torch.tensor([0.0, 5.0])), "cu_seqlens must be"),
    (lambda: mean_pool_varlen(torch.zeros(5, 0), torch.tensor([0, 5])), "hidden size"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
