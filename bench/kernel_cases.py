"""The cases `bench_kernels` times: each kernel's inputs at one model's shapes, its launch, the torch
reference the torch backend serves with, and the bytes the call must move (bench/kernel_traffic.py).

Kernel modules are imported inside the builders, not at the top: `--smoke` switches triton's
interpreter on before the first one is imported, and a missing attention module fails only its own
case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bench import kernel_traffic as traffic

# Targets (issue 14), as fractions of copy bandwidth, and where they are judged (see bench_kernels).
ELEMENTWISE_TARGET, DECODE_TARGET = 0.80, 0.70
TARGET_MIN_TOKENS, TARGET_MIN_CONTEXT = 4096, 1024


@dataclass
class Case:
    kernel: str
    size: str  # what varies: "tokens=128", "batch=64 context=4096"
    bytes_moved: int
    run: Callable[[], object]
    reference: Callable[[], object]
    max_abs_diff: Callable[[], float]  # kernel output against the reference on the same inputs
    target: float | None  # fraction of copy bandwidth, where judged
    flops: int | None = None


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class CaseBuilder:
    """Inputs at one model's shapes on one device; each method returns the cases of one kernel."""

    def __init__(self, shapes: traffic.ModelShapes, dtype: torch.dtype, device: torch.device):
        self.s, self.dtype, self.device = shapes, dtype, device
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.generator = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device).to(self.dtype)

    def elementwise_target(self, num_tokens: int) -> float | None:
        return ELEMENTWISE_TARGET if num_tokens >= TARGET_MIN_TOKENS else None

    def rmsnorm(self, num_tokens: int) -> Case:
        from kernels.rmsnorm import rmsnorm_torch, rmsnorm_triton

        x, residual = self.randn(num_tokens, self.s.hidden), self.randn(num_tokens, self.s.hidden)
        weight = self.randn(self.s.hidden)
        run = lambda: rmsnorm_triton(x, weight, 1e-5, residual)
        reference = lambda: rmsnorm_torch(x, weight, 1e-5, residual)
        return Case("rmsnorm", f"tokens={num_tokens}",
                    traffic.norm_bytes(num_tokens, self.s.hidden, self.elem, residual=True),
                    run, reference, lambda: _diff(run()[0], reference()[0]), self.elementwise_target(num_tokens))

    def layernorm(self, num_tokens: int) -> Case:
        from kernels.layernorm import layernorm_ref, layernorm_triton

        x, residual = self.randn(num_tokens, self.s.hidden), self.randn(num_tokens, self.s.hidden)
        weight, bias = self.randn(self.s.hidden), self.randn(self.s.hidden)
        run = lambda: layernorm_triton(x, weight, bias, 1e-12, residual, keep_sum=False)
        reference = lambda: layernorm_ref(x, weight, bias, 1e-12, residual)
        return Case("layernorm", f"tokens={num_tokens}",
                    traffic.norm_bytes(num_tokens, self.s.hidden, self.elem, residual=True, num_params=2,
                                       store_sum=False),
                    run, reference, lambda: _diff(run()[0], reference()[0]), self.elementwise_target(num_tokens))

    def rope(self, num_tokens: int) -> Case:
        from kernels.rope import build_cos_sin_cache, rope_ref, rope_triton
        from services.worker.models.hf_config import RopeConfig

        s = self.s
        scaling = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0)
        cache = build_cos_sin_cache(scaling.inv_freq(s.head_dim).to(self.device), 8192)
        positions = torch.randint(0, 8192, (num_tokens,), generator=self.generator, device=self.device)
        qkv = self.randn(num_tokens, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim)

        def views(buffer):
            q = buffer[:, : s.num_heads * s.head_dim].view(num_tokens, s.num_heads, s.head_dim)
            k = buffer[:, s.num_heads * s.head_dim : (s.num_heads + s.num_kv_heads) * s.head_dim]
            return q, k.view(num_tokens, s.num_kv_heads, s.head_dim)

        q, k = views(qkv)

        def max_abs_diff() -> float:
            fresh_q, fresh_k = views(qkv.clone())
            expected_q, expected_k = rope_ref(fresh_q, fresh_k, positions, cache)
            rope_triton(fresh_q, fresh_k, positions, cache)
            return max(_diff(fresh_q, expected_q), _diff(fresh_k, expected_k))

        return Case("rope", f"tokens={num_tokens}",
                    traffic.rope_bytes(num_tokens, s.num_heads, s.num_kv_heads, s.head_dim, self.elem),
                    lambda: rope_triton(q, k, positions, cache), lambda: rope_ref(q, k, positions, cache),
                    max_abs_diff, self.elementwise_target(num_tokens))

    def _act(self, name: str, num_tokens: int, run, reference) -> Case:
        x = self.randn(num_tokens, 2 * self.s.intermediate)
        return Case(name, f"tokens={num_tokens}", traffic.act_and_mul_bytes(num_tokens, self.s.intermediate, self.elem),
                    lambda: run(x), lambda: reference(x), lambda: _diff(run(x), reference(x)),
                    self.elementwise_target(num_tokens))

    def silu_and_mul(self, num_tokens: int) -> Case:
        from kernels.activation import silu_and_mul_ref, silu_and_mul_triton

        return self._act("silu_and_mul", num_tokens, silu_and_mul_triton, silu_and_mul_ref)

    def gelu_tanh_and_mul(self, num_tokens: int) -> Case:
        from kernels.activation import gelu_and_mul_triton, gelu_tanh_and_mul_ref

        return self._act("gelu_tanh_and_mul", num_tokens, gelu_and_mul_triton, gelu_tanh_and_mul_ref)

    def write_kv(self, num_tokens: int) -> Case:
        from kernels.kv_write import write_kv_ref, write_kv_triton

        s = self.s
        kv = self.randn(num_tokens, 2, s.num_kv_heads, s.head_dim)
        k, v = kv[:, 0], kv[:, 1]  # strided views, as of a fused qkv buffer
        num_blocks = -(-num_tokens // s.block_size) + 8
        k_cache, v_cache = (self.randn(num_blocks, s.block_size, s.num_kv_heads, s.head_dim) for _ in range(2))
        slots = torch.randperm(num_blocks * s.block_size, generator=self.generator, device=self.device)[:num_tokens]

        def max_abs_diff() -> float:
            caches = [c.clone() for c in (k_cache, v_cache, k_cache, v_cache)]
            write_kv_triton(k, v, caches[0], caches[1], slots)
            write_kv_ref(k, v, caches[2], caches[3], slots)
            return max(_diff(caches[0], caches[2]), _diff(caches[1], caches[3]))

        return Case("write_kv", f"tokens={num_tokens}",
                    traffic.kv_write_bytes(num_tokens, s.num_kv_heads, s.head_dim, self.elem, self.elem),
                    lambda: write_kv_triton(k, v, k_cache, v_cache, slots),
                    lambda: write_kv_ref(k, v, k_cache, v_cache, slots), max_abs_diff, None)

    def paged_batch(self, seq_lens: list[int], new_tokens: list[int]):
        """(q, k_cache, v_cache, AttentionMetadata): each sequence's blocks scattered over the pool."""
        from kernels.ops import AttentionMetadata

        s = self.s
        blocks = [-(-n // s.block_size) for n in seq_lens]
        order = torch.randperm(sum(blocks) + 1, generator=self.generator, device=self.device).to(torch.int32)
        block_tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=self.device)
        taken = 0
        for b, n in enumerate(blocks):
            block_tables[b, :n] = order[taken : taken + n]
            taken += n
        k_cache, v_cache = (self.randn(sum(blocks) + 1, s.block_size, s.num_kv_heads, s.head_dim) for _ in range(2))
        cu = torch.tensor([0, *new_tokens], device=self.device).cumsum(0).to(torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.zeros(int(sum(new_tokens)), dtype=torch.int64, device=self.device),
            cu_seqlens_q=cu, context_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=block_tables, max_seqlen_q=max(new_tokens), max_context_len=max(seq_lens))
        return self.randn(int(sum(new_tokens)), s.num_heads, s.head_dim), k_cache, v_cache, metadata

    def decode_attention(self, num_seqs: int, context_len: int) -> Case:
        from kernels.attention_torch import paged_attention_torch
        from kernels.decode_attention import paged_decode_attention

        s = self.s
        q, k_cache, v_cache, m = self.paged_batch([context_len] * num_seqs, [1] * num_seqs)
        scale = s.head_dim**-0.5
        run = lambda: paged_decode_attention(q, k_cache, v_cache, m.cu_seqlens_q, m.context_lens,
                                             m.block_tables, m.max_context_len, scale)
        reference = lambda: paged_attention_torch(q, k_cache, v_cache, m, scale)
        return Case("decode_attention", f"batch={num_seqs} context={context_len}",
                    traffic.decode_attention_bytes(num_seqs, context_len, s.num_heads, s.num_kv_heads, s.head_dim,
                                                   self.elem, s.block_size),
                    run, reference, lambda: _diff(run(), reference()),
                    DECODE_TARGET if context_len >= TARGET_MIN_CONTEXT else None)

    def prefill_attention(self, seq_lens: list[int]) -> Case:
        from kernels.attention_torch import paged_attention_torch
        from kernels.prefill_attention import paged_prefill_attention

        s = self.s
        q, k_cache, v_cache, m = self.paged_batch(seq_lens, seq_lens)
        scale = s.head_dim**-0.5
        run = lambda: paged_prefill_attention(q, k_cache, v_cache, m.cu_seqlens_q, m.context_lens,
                                              m.block_tables, m.max_seqlen_q, scale)
        reference = lambda: paged_attention_torch(q, k_cache, v_cache, m, scale)
        num_tokens = sum(seq_lens)
        moved = (2 * num_tokens * s.num_heads + 2 * num_tokens * s.num_kv_heads) * s.head_dim * self.elem
        return Case("prefill_attention", f"prompts={len(seq_lens)}x{seq_lens[0]}", moved, run, reference,
                    lambda: _diff(run(), reference()), None,
                    flops=traffic.causal_attention_flops(seq_lens, s.num_heads, s.head_dim))
