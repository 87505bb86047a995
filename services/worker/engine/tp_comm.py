"""What travels between the ranks of a tensor-parallel engine: the collectives of one process group,
and the step's inputs rank 0 broadcasts.

Each engine builds its own process group object (gloo on CPU, NCCL on CUDA) over its own TCPStore,
never `torch.distributed`'s global default group: a worker may hold two engines at once (a version
loading while the old one drains), and a process has only one default group. So the collectives
are called on the group object itself, in one place (this module).

A step's inputs are the flat batch tensors: input ids, positions, logits indices and the tensor
fields of AttentionMetadata. Their shapes and dtypes, the metadata's host values (max_seqlen_q, ...)
and the `StepHost` lists the backend plans from (Ops.plan_step) go to the other ranks as a small
`StepHeader` over each rank's pipe; the tensors follow as one broadcast per dtype (concatenated),
device memory to device memory on NCCL. The header takes the pipe, not the group, so that an idle
engine's ranks wait on a pipe with no timeout while every collective keeps one (`timeout_s`), and
so that a pipe closing tells a rank that rank 0 is gone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kernels.ops import AttentionMetadata, StepHost

_PLAN_FIELD = "backend_plan"  # derived by the backend on each rank, never sent


class Communicator:
    """The collectives of one tensor-parallel group; implements models/tensor_parallel.Communicator."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            self._group = dist.ProcessGroupGloo(store, rank, world_size, timeout)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._group.allreduce([tensor]).wait()

    def broadcast(self, tensor: torch.Tensor) -> None:
        """From rank 0, in place on the others."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._group.broadcast([tensor], options).wait()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape on all), in rank order, on rank 0; None elsewhere."""
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank != 0:
            self._group.gather([], [tensor], options).wait()
            return None
        outputs = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._group.gather([outputs], [tensor], options).wait()
        return outputs


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str  # "input_ids", "positions", "logits_indices", or an AttentionMetadata field
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class StepHeader:
    """The host-side half of a step: enough for a rank to receive the tensors and rebuild the call."""

    tensors: tuple[TensorSpec, ...]
    metadata_values: dict[str, object]  # AttentionMetadata's non-tensor fields (host maxima)
    host: StepHost | None  # what rank 0's backend planned the step from; each rank plans from it too


_MODEL_INPUTS = ("input_ids", "positions", "logits_indices")


def send_step(comm: Communicator, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
              logits_indices: torch.Tensor, host: StepHost | None, send_header) -> None:
    """Rank 0: hands the header to `send_header` (which writes it to every rank's pipe), then
    broadcasts the tensors. Fields are read generically, so metadata fields added later travel too."""
    tensors = {"input_ids": input_ids, "positions": positions, "logits_indices": logits_indices}
    values = {}
    for field in dataclasses.fields(metadata):
        value = getattr(metadata, field.name)
        if field.name == _PLAN_FIELD:
            continue
        if isinstance(value, torch.Tensor):
            tensors[field.name] = value
        else:
            values[field.name] = value
    header = StepHeader(tuple(TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()), values, host)
    send_header(header)
    for dtype, names in _by_dtype(header).items():
        buffer = torch.cat([tensors[n].reshape(-1) for n in names])
        if buffer.numel():
            comm.broadcast(buffer)


def receive_step(comm: Communicator, header: StepHeader, device: torch.device):
    """Other ranks: receives the tensors `header` announces; returns the model's call arguments
    (input_ids, positions, metadata, logits_indices), the metadata not yet planned (header.host)."""
    specs = {spec.name: spec for spec in header.tensors}
    tensors: dict[str, torch.Tensor] = {}
    for dtype, names in _by_dtype(header).items():
        sizes = [_numel(specs[n].shape) for n in names]
        buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
        if buffer.numel():
            comm.broadcast(buffer)
        for name, part in zip(names, buffer.split(sizes)):
            tensors[name] = part.view(specs[name].shape)
    metadata_fields = {n: t for n, t in tensors.items() if n not in _MODEL_INPUTS}
    metadata = AttentionMetadata(**metadata_fields, **header.metadata_values)
    return tensors["input_ids"], tensors["positions"], metadata, tensors["logits_indices"]


def _by_dtype(header: StepHeader) -> dict[torch.dtype, list[str]]:
    groups: dict[torch.dtype, list[str]] = {}
    for spec in header.tensors:
        groups.setdefault(spec.dtype, []).append(spec.name)
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
