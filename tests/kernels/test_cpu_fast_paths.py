"""The torch backend's fast paths equal the references they stand in for."""

from __future__ import annotations

import pytest
import torch

from kernels import linear_cpu
from kernels.rmsnorm import rmsnorm_ref, rmsnorm_torch
from kernels.rope import RopeTorch, build_cos_sin_cache, rope_ref


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rmsnorm_is_bit_identical_in_float32(with_residual):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 96, generator=generator)
    residual = torch.randn(37, 96, generator=generator) if with_residual else None
    weight = torch.randn(96, generator=generator)
    want = rmsnorm_ref(x, weight, 1e-6, residual)
    got = rmsnorm_torch(x, weight, 1e-6, residual)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rmsnorm_keeps_the_reference_for_bfloat16():
    x = torch.randn(5, 32).bfloat16()
    weight = torch.randn(32).bfloat16()
    assert torch.equal(rmsnorm_torch(x, weight, 1e-5)[0], rmsnorm_ref(x, weight, 1e-5)[0])


def test_rope_tables_are_reused_within_a_step_and_renewed_for_the_next():
    cache = build_cos_sin_cache(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 64)
    rope = RopeTorch()
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    step_one = torch.tensor([0, 1, 2, 3, 4, 5])
    for _ in range(2):  # two layers of one step
        torch.testing.assert_close(rope(q, k, step_one, cache), rope_ref(q, k, step_one, cache), atol=0, rtol=0)
    step_two = torch.tensor([6, 7, 8, 9, 10, 11])  # a new tensor: new tables
    torch.testing.assert_close(rope(q, k, step_two, cache), rope_ref(q, k, step_two, cache), atol=0, rtol=0)


@pytest.mark.skipif(not linear_cpu.can_pack(torch.empty(2, 2)), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("num_rows", [1, 8, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear(num_rows, with_bias):
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(192, 64, generator=generator)
    bias = torch.randn(192, generator=generator) if with_bias else None
    x = torch.randn(num_rows, 64, generator=generator)
    got = linear_cpu.packed_linear(x, linear_cpu.pack(weight), bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_pack_declines_what_onednn_does_not_take():
    assert linear_cpu.pack(torch.randn(4, 4, dtype=torch.float64)) is None
    assert linear_cpu.pack(torch.randn(4)) is None


def test_rope_on_a_reused_positions_buffer_rotates_by_its_new_contents():
    """A persistent positions buffer refilled for the next step (as CUDA graph replay does) gets
    tables for its new contents, both when a step is begun and when the op is called directly."""
    cache = build_cos_sin_cache(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 64)
    rope = RopeTorch()
    q, k = torch.randn(4, 4, 16), torch.randn(4, 2, 16)
    positions = torch.tensor([0, 1, 2, 3])
    rope.begin_step(positions)
    for _ in range(2):  # two layers of one step
        torch.testing.assert_close(rope(q, k, positions, cache), rope_ref(q, k, positions, cache), atol=0, rtol=0)
    positions.copy_(torch.tensor([9, 17, 30, 63]))  # the same tensor, the next step's contents
    rope.begin_step(positions)
    torch.testing.assert_close(rope(q, k, positions, cache), rope_ref(q, k, positions, cache), atol=0, rtol=0)
    other = torch.tensor([5, 6, 7, 8])  # a tensor no step was begun for
    torch.testing.assert_close(rope(q, k, other, cache), rope_ref(q, k, other, cache), atol=0, rtol=0)
    other.copy_(torch.tensor([40, 41, 42, 43]))
    torch.testing.assert_close(rope(q, k, other, cache), rope_ref(q, k, other, cache), atol=0, rtol=0)
