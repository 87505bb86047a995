"""Bytes each GPU kernel must move at the least (its compulsory DRAM traffic), and attention's FLOPs.

A kernel's achieved bandwidth is these bytes over its time; against the device's copy bandwidth
(read + write of one large buffer) that says how close it runs to the memory limit. Each count is
every input element read once and every output element written once, nothing re-read: a kernel
that re-reads (from L2 or DRAM) only does worse than the count says. Sizes in bytes; `elem` is the
element size of the activations (2 for bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass

COS_SIN_ELEM = 4  # the rope table is float32 whatever the model's dtype
INDEX_ELEM = 8  # positions and slot_mapping: int64
BLOCK_TABLE_ELEM = 4  # block tables and context lengths: int32


@dataclass(frozen=True, slots=True)
class ModelShapes:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    block_size: int = 16


LLAMA_8B = ModelShapes(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336)
SMOKE = ModelShapes(hidden=72, num_heads=6, num_kv_heads=2, head_dim=40, intermediate=80)  # interpreter check


def norm_bytes(num_tokens: int, hidden: int, elem: int, *, residual: bool, num_params: int = 1,
               store_sum: bool = True) -> int:
    """RMSNorm (num_params=1: weight) or LayerNorm (2: weight and bias): read x (and the residual),
    the parameters once; write the output (and x + residual unless a post-norm caller drops it)."""
    rows_read = 2 if residual else 1
    rows_written = 2 if residual and store_sum else 1
    return num_tokens * hidden * elem * (rows_read + rows_written) + num_params * hidden * elem


def rope_bytes(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, elem: int) -> int:
    """In place: read and write q and k; read each token's position and cos/sin row (v is untouched)."""
    qk = num_tokens * (num_heads + num_kv_heads) * head_dim * elem
    return 2 * qk + num_tokens * (head_dim * COS_SIN_ELEM + INDEX_ELEM)


def act_and_mul_bytes(num_tokens: int, intermediate: int, elem: int) -> int:
    """Read gate || up [N, 2I], write [N, I]."""
    return 3 * num_tokens * intermediate * elem


def kv_write_bytes(num_tokens: int, num_kv_heads: int, head_dim: int, elem: int, cache_elem: int) -> int:
    """Read k and v rows and the slots; write both rows to the caches."""
    rows = 2 * num_tokens * num_kv_heads * head_dim
    return rows * (elem + cache_elem) + num_tokens * INDEX_ELEM


def decode_attention_bytes(num_seqs: int, context_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                           elem: int, block_size: int) -> int:
    """Every cached key and value once (the bulk: 2 B L Hkv D), q read and the output written, the
    block table and context lengths read. A program per KV head reads its K/V once for the group."""
    kv = 2 * num_seqs * context_len * num_kv_heads * head_dim * elem
    q_and_out = 2 * num_seqs * num_heads * head_dim * elem
    blocks = num_seqs * -(-context_len // block_size) * BLOCK_TABLE_ELEM
    return kv + q_and_out + blocks + num_seqs * BLOCK_TABLE_ELEM


def causal_attention_flops(seq_lens: list[int], num_heads: int, head_dim: int) -> int:
    """QK^T and PV over the causal triangle: 2 products of 2 D FLOPs per (query, visible key)."""
    pairs = sum(n * (n + 1) // 2 for n in seq_lens)
    return 4 * head_dim * num_heads * pairs


def copy_bytes(num_bytes: int) -> int:
    """A device-to-device copy reads and writes each byte."""
    return 2 * num_bytes
