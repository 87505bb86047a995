"""Tensor parallelism for the Llama family: which slice of each weight a rank holds, and the layers
that join the slices again (the Megatron-LM split).

With world size T, rank r of a decoder layer holds:
- qkv_proj, column-parallel: the rows of q heads [r*Hq/T, (r+1)*Hq/T) and of the kv heads those
  heads read. With Hkv >= T, kv heads [r*Hkv/T, (r+1)*Hkv/T); with Hkv < T (T a multiple of Hkv)
  kv heads are replicated: rank r holds kv head r // (T / Hkv). Either way a GQA group never
  straddles two ranks, so attention runs on each rank's heads with no communication, and each
  rank's KV cache holds only its kv heads.
- o_proj, row-parallel: the input columns of its q heads. Its product is a partial sum of the layer's
  output; `RowParallel` all-reduces it. A row-parallel bias lives on rank 0 only (zeros elsewhere),
  so the sum adds it once.
- gate_up_proj, column-parallel (rows [r*I/T, (r+1)*I/T) of gate and of up: SiLU-and-mul pairs
  matching columns, so it runs on the shard); down_proj, row-parallel, all-reduced.
That is two all-reduces of [N, hidden] per layer, and the norms, residual stream and rope tables are
the same on every rank (replicated).

Embedding replicated, LM head vocab-split with a gather to rank 0. The lookup reads only N rows, so
a replicated embedding costs memory but no time, where a vocab-split one would cost a third
all-reduce of [N, hidden] every step. The head is the largest single matrix (Llama-3-8B: 128256 x
4096, 1 GiB in bf16, an eighth of the weights) and decode steps are bound by reading weights, so a
replicated head would put a whole head's reads on every step's critical path; split, each rank
reads V/T rows and rank 0, the only rank that samples, gathers [S, V/T] logits per rank (S: the
sampled rows, so at most max_num_seqs). A tied head's shard is a view of the replicated embedding.
A vocabulary T does not divide is split into ceil(V/T)-row shards, the last ones short; their
logits are padded for the gather and trimmed on rank 0.

Weights are float (float32, bfloat16, float16). Weight-only int8/int4 are refused under tensor
parallelism (EngineConfig says so): their scales would be computed per shard and the tied int8 head
is shared with the embedding, which is replicated here; neither is worked out yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import InvalidArgument
from services.worker.models.hf_config import ModelConfig


class Communicator(Protocol):
    """The collectives the sharded model calls (services/worker/engine/tp_comm.py provides them)."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> None: ...  # in place: the sum over ranks

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None: ...  # rank 0: one per rank


def kv_heads_per_rank(config: ModelConfig, world_size: int) -> int:
    """The kv heads each rank's KV cache holds; refuses head counts that do not split over world_size."""
    return ShardPlan.for_model(config, 0, world_size).num_kv_heads


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Which rows and columns of each checkpoint tensor rank `rank` of `world_size` holds."""

    rank: int
    world_size: int
    num_heads: int  # per rank, and so on below
    num_kv_heads: int
    first_kv_head: int
    head_dim: int
    intermediate_size: int
    vocab_rows: int  # ceil(V / T): each rank's head shard, padded to this for the gather
    vocab_size: int  # the whole vocabulary

    @classmethod
    def for_model(cls, config: ModelConfig, rank: int, world_size: int) -> "ShardPlan":
        t = world_size
        if t < 1 or not 0 <= rank < t:
            raise ValueError(f"rank {rank} is not in a tensor-parallel group of {t}")
        hq, hkv = config.num_heads, config.num_kv_heads
        if hq % t:
            raise InvalidArgument(f"tensor_parallel_size {t} must divide config.json num_attention_heads {hq}")
        if hkv % t and t % hkv:
            raise InvalidArgument(
                f"tensor_parallel_size {t} and config.json num_key_value_heads {hkv} must divide one another"
            )
        if config.intermediate_size % t:
            raise InvalidArgument(
                f"tensor_parallel_size {t} must divide config.json intermediate_size {config.intermediate_size}"
            )
        if hkv >= t:
            kv_heads, first_kv = hkv // t, rank * (hkv // t)
        else:  # replicated: T / Hkv consecutive ranks share one kv head
            kv_heads, first_kv = 1, rank // (t // hkv)
        return cls(
            rank=rank, world_size=t, num_heads=hq // t, num_kv_heads=kv_heads, first_kv_head=first_kv,
            head_dim=config.head_dim, intermediate_size=config.intermediate_size // t,
            vocab_rows=-(-config.vocab_size // t), vocab_size=config.vocab_size,
        )

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config one rank's layers are built from: its share of heads and MLP columns. The
        vocabulary stays whole: the embedding is replicated, and `parallelize` splits the head."""
        return dataclasses.replace(config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate_size)

    @property
    def vocab_range(self) -> tuple[int, int]:
        start = min(self.rank * self.vocab_rows, self.vocab_size)
        return start, min(start + self.vocab_rows, self.vocab_size)

    def read(self, name: str, tensor_slice) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name`, read through a safetensors slice (only those
        bytes are read). Tensors outside the split layers come whole."""
        parts = name.rsplit(".", 2)
        projection, kind = (parts[-2], parts[-1]) if len(parts) == 3 else ("", "")
        d = self.head_dim
        if projection == "q_proj":
            return tensor_slice[self.rank * self.num_heads * d : (self.rank + 1) * self.num_heads * d]
        if projection in ("k_proj", "v_proj"):
            return tensor_slice[self.first_kv_head * d : (self.first_kv_head + self.num_kv_heads) * d]
        if projection in ("gate_proj", "up_proj"):
            size = self.intermediate_size
            return tensor_slice[self.rank * size : (self.rank + 1) * size]
        if projection in ("o_proj", "down_proj"):
            if kind == "bias":  # added once, after the all-reduce: rank 0 holds it
                bias = tensor_slice[:]
                return bias if self.rank == 0 else torch.zeros_like(bias)
            size = self.num_heads * d if projection == "o_proj" else self.intermediate_size
            return tensor_slice[:, self.rank * size : (self.rank + 1) * size]
        return tensor_slice[:]


@dataclass(frozen=True, slots=True)
class TensorParallelShard:
    """What `llama.load_model` needs to build one rank's shard: the plan and the rank's collectives."""

    plan: ShardPlan
    comm: Communicator

    def local_config(self, config: ModelConfig) -> ModelConfig:
        return self.plan.local_config(config)

    def read(self, name: str, tensor_slice) -> torch.Tensor:
        return self.plan.read(name, tensor_slice)

    def parallelize(self, model: nn.Module) -> None:
        """After loading, before the CPU path packs the linear layers (packing swaps the layers
        inside these wrappers, which keep their collectives): all-reduce the row-parallel outputs,
        split the head's vocabulary."""
        from services.worker.models.llama import Linear  # llama imports this module's names lazily

        for layer in model.model.layers:
            layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, self.comm)
            layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, self.comm)
        start, end = self.plan.vocab_range
        embedding = model.model.embed_tokens.weight
        if model.lm_head is None:
            rows = embedding[start:end]  # tied: a view, no copy
        else:
            rows = model.lm_head.weight[start:end].clone()  # the whole head is freed below
        with torch.device("meta"):  # parameters come from `rows`; nothing to allocate
            head = Linear(embedding.shape[1], end - start, False, embedding.dtype)
        head.weight = nn.Parameter(rows, requires_grad=False)
        model.lm_head = VocabParallelHead(head, self.comm, self.plan.vocab_rows, self.plan.vocab_size)


class RowParallel(nn.Module):
    """A row-parallel linear layer: `inner` multiplies this rank's input columns (a partial sum of
    the full output), the all-reduce adds the ranks' partial sums."""

    def __init__(self, inner: nn.Module, comm: Communicator):
        super().__init__()
        self.inner = inner
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.comm.all_reduce(out)
        return out


class VocabParallelHead(nn.Module):
    """The LM head over this rank's vocabulary rows; rank 0 gathers every rank's logits.
    [S, hidden] -> rank 0: [S, vocab_size]; other ranks: [S, 0] (they never sample)."""

    def __init__(self, inner: nn.Module, comm: Communicator, vocab_rows: int, vocab_size: int):
        super().__init__()
        self.inner = inner
        self.comm = comm
        self.vocab_rows = vocab_rows
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 0:  # a step that samples nothing: every rank sees S = 0, none gathers
            return hidden.new_empty(0, self.vocab_size if self.comm.rank == 0 else 0)
        logits = self.inner(hidden)  # [S, rows of this rank]
        if logits.shape[1] < self.vocab_rows:  # a short last shard: equal sizes for the gather
            logits = F.pad(logits, (0, self.vocab_rows - logits.shape[1]))
        gathered = self.comm.gather(logits.contiguous())
        if gathered is None:
            return logits[:, :0]
        return torch.cat(gathered, dim=1)[:, : self.vocab_size]
