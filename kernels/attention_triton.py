"""`Ops.paged_attention` for the Triton backend: picks the decode or the varlen prefill kernel.

Same contract as `attention_ref.paged_attention_ref` (the spec): q [N, Hq, D], the paged cache
[num_blocks, block_size, Hkv, D] with this step's K/V written, `AttentionMetadata` describing the
step, which may mix prefill chunks, whole prompts and decode rows.

The choice reads host ints only, never a device tensor (no .item()/.tolist(): the decode step runs
inside CUDA graphs):
  - metadata.max_seqlen_q <= 1, a decode-only step (the CUDA-graph case): `paged_decode_attention`,
    one program per (sequence, KV head[, partition]), split over the context when the batch is
    too small to fill the GPU (max_context_len sizes it);
  - otherwise `paged_prefill_attention`, one launch for the whole step: its tiles cover a decode
    row (one token, `group` tile rows) as well as a prompt, so a mixed step needs no split of the
    batch into phases, and no host-side list of which rows decode.
metadata.backend_plan is neither read nor written.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kernels.attention_checks import check_host_int
from kernels.decode_attention import NUM_SMS_H100, paged_decode_attention
from kernels.ops import AttentionMetadata
from kernels.prefill_attention import paged_prefill_attention


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_sms: int | None = None,
) -> torch.Tensor:
    """num_sms: the SM count the split-KV choice fills; None reads the device's (132 off CUDA)."""
    check_host_int(metadata.max_seqlen_q, "metadata.max_seqlen_q")
    if num_sms is None:
        num_sms = _num_sms(q.device)
    if metadata.max_seqlen_q <= 1:
        return paged_decode_attention(
            q, k_cache, v_cache, metadata.cu_seqlens_q, metadata.context_lens, metadata.block_tables,
            metadata.max_context_len, scale, sliding_window=sliding_window, num_sms=num_sms,
        )
    return paged_prefill_attention(
        q, k_cache, v_cache, metadata.cu_seqlens_q, metadata.context_lens, metadata.block_tables,
        metadata.max_seqlen_q, scale, causal=True, sliding_window=sliding_window,
    )


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """SM count of a CUDA device (a host-side property: no sync), else that of an H100/H200."""
    if device.type != "cuda":
        return NUM_SMS_H100
    return torch.cuda.get_device_properties(device).multi_processor_count
