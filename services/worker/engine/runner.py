"""Runs the model on one step: persistent buffers in, logits out.

The runner reads `StepInputs` only (plain data, services/worker/engine/step_inputs.py). It applies
what changed to its persistent per-sequence buffers (`RequestSlots`), gathers the step's flat batch
from them on the device into preallocated outputs (`kernels.batch_core.build_flat_batch`), lets the
backend plan the step from the host lists it already has (`Ops.plan_step`: nothing is read back from
the device during the forward pass), and runs the model — or, for a decode-only step with CUDA
graphs on, replays the graph captured for its padded batch size (services/worker/engine/cuda_graphs.py).

Layout: the scheduled sequences' new tokens are concatenated in batch order, so sequence b owns rows
cu_seqlens_q[b]:cu_seqlens_q[b + 1] of input_ids / positions / slot_mapping, and its logits row (if it
samples this step) is its last row.
"""

from __future__ import annotations

import torch

from kernels.batch_core import FlatBatch, FlatBatchBuffers, build_flat_batch
from kernels.ops import StepHost
from services.worker.engine.cuda_graphs import DecodeGraphs
from services.worker.engine.request_slots import RequestSlots
from services.worker.engine.step_inputs import StepInputs
from services.worker.models.llama import KVCache, LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int,
                 device: str | torch.device, *, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.slots = RequestSlots(max_num_seqs, max_model_len, block_size, self.device)
        # A padded decode batch may hold more rows than the token budget when that is below max_num_seqs.
        self.buffers = FlatBatchBuffers.allocate(max(max_num_batched_tokens, max_num_seqs), max_num_seqs,
                                                 self.slots.max_blocks, self.device)
        self.max_model_len = max_model_len
        self.graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, capture: bool = True) -> None:
        """Decode-only steps run padded to a batch-size bucket: replayed from CUDA graphs captured
        now, or (capture=False, anywhere) run eagerly on the same padded buffers."""
        self.graphs = DecodeGraphs(self.forward, self.buffers, self.max_model_len)
        if capture:
            self.graphs.capture()

    def run(self, step: StepInputs) -> torch.Tensor | None:
        """[S, vocab_size] float32 logits, one row per entry of step.sampling; None when nothing is scheduled."""
        self.slots.update(step)
        if not step.num_seqs:
            return None
        desc, host = self.slots.describe(step)
        batch = build_flat_batch(desc, self.slots.token_ids, self.slots.block_tables, self.block_size, self.buffers)
        if self.graphs is not None and self.graphs.takes(desc):
            return self.graphs.run(desc.num_seqs, host)
        return self.forward(batch, host)

    def forward(self, batch: FlatBatch, host: StepHost) -> torch.Tensor:
        """The model on one flat batch, planned first from its host lists."""
        metadata = batch.attention_metadata()
        self.model.ops.plan_step(metadata, host, batch.positions, self.kv_caches[0][0])
        if self.model.prompt_rows is not None and host.num_prompt_rows:
            self.model.prompt_rows.plan(host.cu_seqlens_q, host.num_prompt_rows, self.device)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, metadata, batch.logits_indices)
