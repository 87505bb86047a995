"""`RequestSlots`: the runner's persistent per-sequence state, on the model's device.

Each sequence the runner has been told of holds one slot: a row of `token_ids [max_num_seqs,
max_model_len]` and of `block_tables [max_num_seqs, max_blocks]`, allocated once with the engine.
A step's `StepInputs` changes them by small writes — a new sequence's whole row, a running one's few
new tokens and blocks, all of these together in one scatter per buffer — and the step's flat batch
is then gathered from them on the device (`kernels.batch_core.build_flat_batch`) from a few ints per
sequence, rather than rebuilt from Python lists at a new shape every step.

Rows past a sequence's length hold nothing it reads: tokens past num_tokens are never gathered, and
a block table row is zero past its blocks (AttentionMetadata's padding).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from kernels.batch_core import StepDescription
from kernels.ops import StepHost
from services.worker.engine.step_inputs import StepInputs


class RequestSlots:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, device: str | torch.device):
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.token_ids = torch.zeros(max_num_seqs, max_model_len, dtype=torch.int32, device=self.device)
        self.block_tables = torch.zeros(max_num_seqs, self.max_blocks, dtype=torch.int32, device=self.device)
        self._slot_of: dict[str, int] = {}  # request_id -> its row
        self._num_tokens = [0] * max_num_seqs  # per row: tokens and blocks it holds (host copies)
        self._num_blocks = [0] * max_num_seqs
        self._num_prompt_tokens = [0] * max_num_seqs
        self._free = list(range(max_num_seqs - 1, -1, -1))  # pop() takes the lowest free row
        self._pin = self.device.type == "cuda"  # pinned host memory: copies to the device do not block

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def slot(self, request_id: str) -> int:
        return self._slot_of[request_id]

    def update(self, step: StepInputs) -> None:
        """Frees the released rows, then fills the new sequences' and appends to the running ones'."""
        for request_id in step.released_ids:
            self._free.append(self._slot_of.pop(request_id))
        tokens: tuple[list[int], list[int], list[int]] = ([], [], [])  # rows, columns, values to scatter
        blocks: tuple[list[int], list[int], list[int]] = ([], [], [])
        for new in step.new_seqs:
            if not self._free:
                raise ValueError(f"no free slot for {new.request_id!r}: all {len(self._num_tokens)} are held")
            slot = self._slot_of[new.request_id] = self._free.pop()
            self._num_tokens[slot] = self._num_blocks[slot] = 0
            self._num_prompt_tokens[slot] = new.num_prompt_tokens
            self.block_tables[slot].zero_()  # what the row's last sequence left
            self._append(tokens, slot, self._num_tokens, new.token_ids, self.max_model_len, "tokens")
            self._append(blocks, slot, self._num_blocks, new.block_ids, self.max_blocks, "blocks")
        for running in step.running_seqs:
            slot = self._slot_of[running.request_id]
            self._append(tokens, slot, self._num_tokens, running.new_token_ids, self.max_model_len, "tokens")
            self._append(blocks, slot, self._num_blocks, running.new_block_ids, self.max_blocks, "blocks")
        self._scatter(self.token_ids, tokens)
        self._scatter(self.block_tables, blocks)

    def describe(self, step: StepInputs) -> tuple[StepDescription, StepHost]:
        """The step for build_flat_batch (rows and counts), and its host lists for the backend's plan."""
        slots = [self._slot_of[request_id] for request_id in step.request_ids]
        desc = StepDescription.from_lists(slots, step.num_computed_tokens, step.num_scheduled_tokens,
                                          step.sample_flags, pin_memory=self._pin)
        host = StepHost(
            cu_seqlens_q=list(accumulate(step.num_scheduled_tokens, initial=0)),
            context_lens=[c + n for c, n in zip(step.num_computed_tokens, step.num_scheduled_tokens)],
            num_prompt_rows=[max(0, min(n, self._num_prompt_tokens[slot] - c))
                             for slot, c, n in zip(slots, step.num_computed_tokens, step.num_scheduled_tokens)],
        )
        return desc, host

    @staticmethod
    def _append(writes, slot: int, lengths: list[int], values: list[int], limit: int, what: str) -> None:
        start = lengths[slot]
        if start + len(values) > limit:
            raise ValueError(f"slot {slot} would hold {start + len(values)} {what}; it has room for {limit}")
        writes[0].extend([slot] * len(values))
        writes[1].extend(range(start, start + len(values)))
        writes[2].extend(values)
        lengths[slot] = start + len(values)

    def _scatter(self, buffer: torch.Tensor, writes) -> None:
        """One copy to the device and one scatter for all of a step's writes to buffer."""
        if not writes[0]:
            return
        packed = torch.tensor(writes, dtype=torch.int64, pin_memory=self._pin).to(self.device, non_blocking=True)
        buffer.index_put_((packed[0], packed[1]), packed[2].to(buffer.dtype))
