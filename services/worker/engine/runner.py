"""Builds the step's flat batch from a SchedulerOutput and runs the model on it.

Layout: the scheduled sequences' new tokens are concatenated in batch order, so sequence b owns rows
cu_seqlens_q[b]:cu_seqlens_q[b + 1] of input_ids / positions / slot_mapping, and its logits row (if it
samples this step) is its last row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.ops import AttentionMetadata
from services.worker.engine.scheduler import SchedulerOutput
from services.worker.models.llama import KVCache, LlamaForCausalLM


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor  # [N] int64: every scheduled sequence's new tokens, concatenated
    positions: torch.Tensor  # [N] int64: each token's position in its sequence
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: the last row of each sequence that samples


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int, device: str | torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)

    def run(self, out: SchedulerOutput) -> torch.Tensor | None:
        """[S, vocab_size] float32 logits for out.sampled_seqs, or None when nothing is scheduled."""
        if not out.scheduled_seqs:
            return None
        batch = self.prepare(out)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata, batch.logits_indices)

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu_seqlens = [0]
        context_lens: list[int] = []
        logits_indices: list[int] = []
        for seq, num_tokens, sample in zip(out.scheduled_seqs, out.num_scheduled_tokens, out.sample_flags):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // size] * size + p % size for p in range(start, end))
            cu_seqlens.append(cu_seqlens[-1] + num_tokens)
            context_lens.append(end)
            if sample:
                logits_indices.append(cu_seqlens[-1] - 1)
        max_blocks = max(len(seq.block_table) for seq in out.scheduled_seqs)
        block_tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in out.scheduled_seqs]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        metadata = AttentionMetadata(
            slot_mapping=tensor(slot_mapping, torch.int64),
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),  # [B, max_blocks]
            max_seqlen_q=max(out.num_scheduled_tokens),
            max_context_len=max(context_lens),
        )
        return ModelInput(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            metadata=metadata,
            logits_indices=tensor(logits_indices, torch.int64),
        )
