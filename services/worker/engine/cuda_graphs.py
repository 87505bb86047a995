"""CUDA graphs for decode-only steps, replayed at padded batch sizes.

A decode step launches a few kernels per layer for one token per sequence: on a GPU it is bound by
launch overhead, not by the hardware, unless its launches are recorded once and replayed. For each
batch-size bucket b (1, 2, 4, 8, 16, 24, ... max_num_seqs: `batch_buckets`) the model's forward over
rows [:b] of the runner's `FlatBatchBuffers` is captured once, largest first, all graphs sharing one
memory pool (they never run at once, so their intermediates may share memory too).

A decode-only step of B sequences (each computes one token and samples it) takes the smallest bucket
b >= B: `build_flat_batch` has written rows [:B] of those same buffers, and `_pad` makes rows [B:b]
rows that touch nothing: token 0 at position 0, cache slot -1 (write_kv writes nothing), context
length 1 on block 0 (one key of some block: finite, and read by that row alone), and a logits row
of their own. The graph writes its logits into one static [max_num_seqs, vocab] output; rows [:B]
are returned, a view valid until the next step. Other steps (any prefill row) run eagerly.

Captured with max_seqlen_q = 1 and max_context_len = max_model_len: launch grids (decode attention's
KV split) are fixed at capture, so they are sized for the longest context; each row's own length is
read from context_lens when the graph runs. Capture needs ops that neither sync nor build tensors
from host lists in the forward pass or in plan_step: the triton backend. The torch backend's plan
makes its index tensors per step, which a graph would freeze, so the engine captures only with triton.

Without CUDA (capture=False) the padded batch runs eagerly through the same buffers and padding:
what the CPU tests check, token for token against unpadded steps.
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch

from kernels.batch_core import FlatBatch, FlatBatchBuffers, StepDescription
from kernels.ops import StepHost


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The padded decode batch sizes: 1, 2, 4, then every multiple of 8, and max_num_seqs itself."""
    sizes = {b for b in (1, 2, 4) if b <= max_num_seqs} | set(range(8, max_num_seqs + 1, 8)) | {max_num_seqs}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, forward: Callable[[FlatBatch, StepHost], torch.Tensor], buffers: FlatBatchBuffers,
                 max_model_len: int):
        self.forward = forward  # the runner's eager forward (plan_step, then the model)
        self.buffers = buffers
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(buffers.max_seqs)
        device = buffers.input_ids.device
        self._rows32 = torch.arange(buffers.max_seqs + 1, dtype=torch.int32, device=device)
        self._rows64 = self._rows32.long()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [max_num_seqs, vocab] float32: every graph's output
        self.num_runs = 0  # decode steps taken (replayed, or run padded when not captured)
        self.num_padded_rows = 0

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def takes(self, desc: StepDescription) -> bool:
        """Whether the step is decode-only and fits the largest bucket."""
        return desc.max_seqlen_q == 1 and desc.num_sampled == desc.num_seqs and desc.num_seqs <= self.buckets[-1]

    def bucket(self, num_seqs: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_seqs)]

    def run(self, num_seqs: int, host: StepHost) -> torch.Tensor:
        """[num_seqs, vocab] logits of the decode step whose rows [:num_seqs] are in the buffers."""
        bucket = self.bucket(num_seqs)
        self._pad(num_seqs, bucket)
        self.num_runs += 1
        self.num_padded_rows += bucket - num_seqs
        graph = self._graphs.get(bucket)
        if graph is None:
            return self.forward(self._batch(bucket), _padded_host(host, bucket))[:num_seqs]
        graph.replay()
        return self._logits[:num_seqs]

    def capture(self) -> None:
        """Captures every bucket's graph (CUDA only); the rows hold padding meanwhile, so capture
        writes nothing to the KV cache."""
        if self.buffers.input_ids.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the buffers are on {self.buffers.input_ids.device}")
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self._pad(0, bucket)
            batch, host = self._batch(bucket), _padded_host(StepHost([0], []), bucket)
            warm = self.forward(batch, host)  # compiles kernels and allocates workspaces outside the graph
            if self._logits is None:
                self._logits = warm.new_empty(self.buffers.max_seqs, warm.shape[-1])
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                # Into the one shared output: each graph's own logits are freed for the next capture.
                self._logits[:bucket].copy_(self.forward(batch, host))
            self._graphs[bucket] = graph
        torch.cuda.synchronize()

    def _batch(self, bucket: int) -> FlatBatch:
        b = self.buffers
        return FlatBatch(b.input_ids[:bucket], b.positions[:bucket], b.slot_mapping[:bucket],
                         b.cu_seqlens_q[: bucket + 1], b.context_lens[:bucket], b.block_tables[:bucket],
                         b.logits_indices[:bucket], max_seqlen_q=1, max_context_len=self.max_model_len)

    def _pad(self, num_seqs: int, bucket: int) -> None:
        """Rows [num_seqs:bucket] become padding (see the module's docstring)."""
        if num_seqs == bucket:
            return
        b, rows = self.buffers, slice(num_seqs, bucket)
        b.input_ids[rows].zero_()
        b.positions[rows].zero_()
        b.slot_mapping[rows].fill_(-1)
        b.cu_seqlens_q[num_seqs : bucket + 1].copy_(self._rows32[num_seqs : bucket + 1])
        b.context_lens[rows].fill_(1)
        b.block_tables[rows].zero_()
        b.logits_indices[rows].copy_(self._rows64[rows])


def _padded_host(host: StepHost, bucket: int) -> StepHost:
    num_seqs = len(host.context_lens)
    return StepHost(cu_seqlens_q=[*host.cu_seqlens_q, *range(num_seqs + 1, bucket + 1)],
                    context_lens=[*host.context_lens, *[1] * (bucket - num_seqs)])
