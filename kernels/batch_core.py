"""The batching core: a step's flat batch built on the device from a compact host description.

The runner keeps persistent per-slot buffers on the device, `token_ids [max_slots, max_len]` and
`block_tables [max_slots, max_blocks]`; a step is described by a few ints per scheduled sequence
(`StepDescription`): its slot, tokens already cached, tokens computed now, whether it samples. The
host packs these into one small int32 array (pinned where CUDA is present), copies it to the device
in one transfer, and `build_flat_batch` expands it there into the model's inputs (`FlatBatch`):

    sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]; row cu_seqlens_q[b] + i is token
    p = num_computed[b] + i of slot s = slots[b]:
        input_ids[row]    = token_ids[s, p]
        positions[row]    = p
        slot_mapping[row] = block_tables[s, p // block_size] * block_size + p % block_size
    context_lens[b] = num_computed[b] + num_new[b];  block_tables[b] = block_tables[s] (whole row)
    logits_indices = the last row of each sampling sequence, in batch order

Two implementations fill the same outputs. `torch` (vectorised: repeat_interleave, gathers) is the
reference and the CPU path. `cuda` is the CUDA C kernel in csrc/batch_core.cu, compiled by CuPy's
NVRTC at first use and launched once on torch's current stream, sharing memory through DLPack: one
thread per output element, each token finding its sequence by binary search over cu_seqlens. It
replaces the torch path's ~20 small launches with one (bench/bench_batch_core.py measures both).
The host does the O(B) parts it already knows, cu_seqlens and the logits rows, while packing.

Nothing here syncs the host with the device: bounds are checked on the host description, and the
outputs are views of `FlatBatchBuffers` when given, so CUDA graphs see fixed addresses.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kernels.ops import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "batch_core.cu"
IMPLS = ("auto", "torch", "cuda")
THREADS_PER_BLOCK = 256
_KERNEL_NAMES = {torch.int32: "build_flat_batch_i32", torch.int64: "build_flat_batch_i64"}


def packed_len(num_seqs: int, num_sampled: int) -> int:
    """Length of the packed description: slots, num_computed, num_new, sample, cu_seqlens, logits rows."""
    return 5 * num_seqs + 1 + num_sampled


@dataclass(frozen=True, slots=True)
class StepDescription:
    """What one step computes, per scheduled sequence b in batch order, packed in one int32 array.

    The per-sequence fields are views of `packed` (layout in csrc/batch_core.cu); the ints are host
    copies of what launchers and the attention backend need, so nothing reads them back."""

    packed: torch.Tensor  # [5B + 1 + S] int32 on the host, pinned where CUDA is present
    num_seqs: int  # B
    num_sampled: int  # S: sequences whose last new token's logits are sampled
    num_tokens: int  # N = sum(num_new)
    max_seqlen_q: int  # max(num_new)
    max_context_len: int  # max(num_computed + num_new)
    max_slot: int  # max(slots), checked against the persistent buffers without touching them

    @classmethod
    def from_lists(cls, slots: Sequence[int], num_computed: Sequence[int], num_new: Sequence[int],
                   sample: Sequence[int | bool], *, pin_memory: bool | None = None) -> StepDescription:
        """Checks and packs the lists; pin_memory defaults to whether CUDA is present (pinned memory
        makes the copy to the device asynchronous; torch's host allocator caches the blocks)."""
        num_seqs = len(slots)
        if num_seqs == 0:
            raise ValueError("a step description needs at least one sequence")
        for name, values in (("num_computed", num_computed), ("num_new", num_new), ("sample", sample)):
            if len(values) != num_seqs:
                raise ValueError(f"{name} has {len(values)} entries, slots has {num_seqs}")
        # Checked and summed in numpy, which costs a fraction of Python's min/max/zip per element; this
        # runs every step (measured: 51 us at 256 sequences, 22 at 64, against 120 and 41 in Python).
        fields = np.empty((4, num_seqs), dtype=np.int64)  # slots, num_computed, num_new, sample
        try:
            fields[0], fields[1], fields[2], fields[3] = slots, num_computed, num_new, sample
        except (OverflowError, TypeError, ValueError) as error:
            raise ValueError(f"a step description holds ints: {error}") from None
        slots_np, computed_np, new_np, sample_np = fields
        if new_np.min() < 1:
            raise ValueError(f"num_new must be >= 1 for every scheduled sequence, got {list(num_new)}")
        if computed_np.min() < 0 or slots_np.min() < 0:
            raise ValueError("slots and num_computed must be >= 0")
        if ((sample_np & ~1) != 0).any():
            raise ValueError(f"sample must hold 0/1 flags, got {list(sample)}")
        if len(set(slots)) != num_seqs:
            raise ValueError(f"each slot may appear once per step, got {list(slots)}")
        ends = np.cumsum(new_np)  # cu_seqlens[1:]
        logits_rows = ends[sample_np == 1] - 1
        max_context_len = int((computed_np + new_np).max())
        if max(max_context_len, int(ends[-1]), int(slots_np.max())) > np.iinfo(np.int32).max:
            raise ValueError("a step description's slots, positions and token counts must fit in int32")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        packed = torch.empty(packed_len(num_seqs, logits_rows.size), dtype=torch.int32, pin_memory=pin_memory)
        flat = packed.numpy()
        flat[: 4 * num_seqs] = fields.reshape(-1)
        flat[4 * num_seqs] = 0
        flat[4 * num_seqs + 1 : 5 * num_seqs + 1] = ends
        flat[5 * num_seqs + 1 :] = logits_rows
        return cls(packed=packed, num_seqs=num_seqs, num_sampled=int(logits_rows.size), num_tokens=int(ends[-1]),
                   max_seqlen_q=int(new_np.max()), max_context_len=max_context_len, max_slot=int(slots_np.max()))

    def _field(self, index: int) -> torch.Tensor:
        return self.packed[index * self.num_seqs : (index + 1) * self.num_seqs]

    @property
    def slots(self) -> torch.Tensor:  # [B] int32
        return self._field(0)

    @property
    def num_computed(self) -> torch.Tensor:  # [B] int32
        return self._field(1)

    @property
    def num_new(self) -> torch.Tensor:  # [B] int32
        return self._field(2)

    @property
    def sample(self) -> torch.Tensor:  # [B] int32, 0/1
        return self._field(3)

    @property
    def cu_seqlens(self) -> torch.Tensor:  # [B + 1] int32
        return self.packed[4 * self.num_seqs : 5 * self.num_seqs + 1]

    @property
    def logits_rows(self) -> torch.Tensor:  # [S] int32
        return self.packed[5 * self.num_seqs + 1 :]


@dataclass(slots=True)
class FlatBatch:
    """The model's inputs for one step (shapes with N tokens, B sequences, S sampled)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: cache slot (block * block_size + offset) of each token
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32: the persistent table's rows, whole
    logits_indices: torch.Tensor  # [S] int64
    max_seqlen_q: int  # host copies from the description
    max_context_len: int

    def attention_metadata(self) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping, cu_seqlens_q=self.cu_seqlens_q,
                                 context_lens=self.context_lens, block_tables=self.block_tables,
                                 max_seqlen_q=self.max_seqlen_q, max_context_len=self.max_context_len)


@dataclass(frozen=True, slots=True)
class FlatBatchBuffers:
    """Preallocated outputs: a step's FlatBatch is made of prefix views of these, at fixed addresses."""

    input_ids: torch.Tensor  # [max_tokens] int64
    positions: torch.Tensor  # [max_tokens] int64
    slot_mapping: torch.Tensor  # [max_tokens] int64
    cu_seqlens_q: torch.Tensor  # [max_seqs + 1] int32
    context_lens: torch.Tensor  # [max_seqs] int32
    block_tables: torch.Tensor  # [max_seqs, max_blocks] int32
    logits_indices: torch.Tensor  # [max_seqs] int64
    desc: torch.Tensor  # [packed_len(max_seqs, max_seqs)] int32: the description's device copy

    @classmethod
    def allocate(cls, max_tokens: int, max_seqs: int, max_blocks: int, device: str | torch.device) -> FlatBatchBuffers:
        def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(input_ids=empty(max_tokens, dtype=torch.int64), positions=empty(max_tokens, dtype=torch.int64),
                   slot_mapping=empty(max_tokens, dtype=torch.int64),
                   cu_seqlens_q=empty(max_seqs + 1, dtype=torch.int32),
                   context_lens=empty(max_seqs, dtype=torch.int32),
                   block_tables=empty(max_seqs, max_blocks, dtype=torch.int32),
                   logits_indices=empty(max_seqs, dtype=torch.int64),
                   desc=empty(packed_len(max_seqs, max_seqs), dtype=torch.int32))

    @property
    def max_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_seqs(self) -> int:
        return self.context_lens.shape[0]

    def views(self, desc: StepDescription) -> FlatBatch:
        n, b, s = desc.num_tokens, desc.num_seqs, desc.num_sampled
        return FlatBatch(self.input_ids[:n], self.positions[:n], self.slot_mapping[:n], self.cu_seqlens_q[: b + 1],
                         self.context_lens[:b], self.block_tables[:b], self.logits_indices[:s],
                         desc.max_seqlen_q, desc.max_context_len)


def build_flat_batch(desc: StepDescription, token_ids: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                     out: FlatBatchBuffers | None = None, *, impl: str = "auto") -> FlatBatch:
    """The step's FlatBatch on token_ids' device; views of `out` when given.

    impl: "torch", "cuda" (the CuPy kernel; CUDA tensors only) or "auto" (cuda where the tensors are
    on CUDA and the kernel loads, else torch)."""
    _check(desc, token_ids, block_tables, block_size, out, impl)
    device = token_ids.device
    if impl == "auto":
        impl = "cuda" if device.type == "cuda" and cuda_unavailable_reason(device) is None else "torch"
    elif impl == "cuda" and device.type != "cuda":
        raise ValueError(f"impl 'cuda' needs CUDA tensors, got token_ids on {device}")
    result = out.views(desc) if out is not None else _allocate(desc, block_tables.shape[1], device)
    if device.type == "cpu":
        device_desc = desc.packed
    elif out is not None:
        device_desc = out.desc[: desc.packed.shape[0]]
        device_desc.copy_(desc.packed, non_blocking=True)
    else:
        device_desc = desc.packed.to(device, non_blocking=True)
    if impl == "cuda":
        _build_cuda(desc, device_desc, token_ids, block_tables, block_size, result)
    else:
        _build_torch(desc, device_desc, token_ids, block_tables, block_size, result)
    return result


def _check(desc: StepDescription, token_ids: torch.Tensor, block_tables: torch.Tensor, block_size: int,
           out: FlatBatchBuffers | None, impl: str) -> None:
    """Shapes, dtypes and bounds, all from host values: the launch itself never checks and never syncs."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if token_ids.dim() != 2 or token_ids.dtype not in _KERNEL_NAMES:
        raise ValueError(f"token_ids must be [max_slots, max_len] int32 or int64, got {tuple(token_ids.shape)} "
                         f"{token_ids.dtype}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [max_slots, max_blocks] int32, got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype}")
    if block_tables.device != token_ids.device:
        raise ValueError(f"token_ids on {token_ids.device} and block_tables on {block_tables.device}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    num_slots = min(token_ids.shape[0], block_tables.shape[0])
    if desc.max_slot >= num_slots:
        raise ValueError(f"slot {desc.max_slot} is out of range for buffers of {num_slots} slots")
    if desc.max_context_len > token_ids.shape[1]:
        raise ValueError(f"a context of {desc.max_context_len} tokens exceeds token_ids' {token_ids.shape[1]}")
    needed_blocks = -(-desc.max_context_len // block_size)
    if needed_blocks > block_tables.shape[1]:
        raise ValueError(f"a context of {desc.max_context_len} tokens needs {needed_blocks} blocks of "
                         f"{block_size}; block_tables has {block_tables.shape[1]} per slot")
    if out is None:
        return
    if out.input_ids.device != token_ids.device:
        raise ValueError(f"out buffers on {out.input_ids.device}, token_ids on {token_ids.device}")
    if desc.num_tokens > out.max_tokens or desc.num_seqs > out.max_seqs:
        raise ValueError(f"a step of {desc.num_tokens} tokens over {desc.num_seqs} sequences exceeds out "
                         f"buffers of {out.max_tokens} tokens and {out.max_seqs} sequences")
    if out.block_tables.shape[1] != block_tables.shape[1]:
        raise ValueError(f"out.block_tables has {out.block_tables.shape[1]} blocks per row, block_tables "
                         f"{block_tables.shape[1]}")


def _allocate(desc: StepDescription, max_blocks: int, device: torch.device) -> FlatBatch:
    n, b, s = desc.num_tokens, desc.num_seqs, desc.num_sampled
    i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
    return FlatBatch(torch.empty(n, **i64), torch.empty(n, **i64), torch.empty(n, **i64), torch.empty(b + 1, **i32),
                     torch.empty(b, **i32), torch.empty(b, max_blocks, **i32), torch.empty(s, **i64),
                     desc.max_seqlen_q, desc.max_context_len)


def _build_torch(desc: StepDescription, device_desc: torch.Tensor, token_ids: torch.Tensor,
                 block_tables: torch.Tensor, block_size: int, result: FlatBatch) -> None:
    """The reference: the same outputs from whole-batch tensor ops, no per-token Python loop."""
    b = desc.num_seqs
    slots, num_computed, num_new = (device_desc[i * b : (i + 1) * b] for i in range(3))
    cu_seqlens = device_desc[4 * b : 5 * b + 1]
    # Sequence of each row; output_size keeps repeat_interleave from reading the total back.
    seq_of_row = torch.repeat_interleave(num_new, output_size=desc.num_tokens)  # [N]
    # Row r of sequence b is position num_computed[b] + r - cu_seqlens[b].
    offsets = (num_computed - cu_seqlens[:-1]).long()  # [B]
    positions = torch.arange(desc.num_tokens, device=device_desc.device) + offsets[seq_of_row]  # [N]
    row_slots = slots.long()[seq_of_row]  # [N]
    result.input_ids.copy_(token_ids[row_slots, positions])
    result.positions.copy_(positions)
    blocks = block_tables[row_slots, torch.div(positions, block_size, rounding_mode="floor")]  # [N] int32
    result.slot_mapping.copy_(blocks.long() * block_size + positions % block_size)
    result.cu_seqlens_q.copy_(cu_seqlens)
    result.context_lens.copy_(num_computed + num_new)
    torch.index_select(block_tables, 0, slots, out=result.block_tables)
    result.logits_indices.copy_(device_desc[5 * b + 1 :])


def launch_plan(desc: StepDescription, device_desc: torch.Tensor, token_ids: torch.Tensor,
                block_tables: torch.Tensor, block_size: int, result: FlatBatch) -> tuple[str, int, list]:
    """(kernel name, blocks of THREADS_PER_BLOCK, arguments) of the one launch; the arguments are
    tensors (passed as pointers) and numpy scalars, in the order of the kernel's signature."""
    b, s, max_blocks = desc.num_seqs, desc.num_sampled, block_tables.shape[1]
    num_threads = desc.num_tokens + b * max_blocks + (b + 1) + b + s  # the five ranges in batch_core.cu
    args = [device_desc, np.int32(b), np.int32(s), np.int32(desc.num_tokens),
            token_ids, np.int64(token_ids.stride(0)), np.int64(token_ids.stride(1)),
            block_tables, np.int64(block_tables.stride(0)), np.int64(block_tables.stride(1)),
            np.int32(max_blocks), np.int32(block_size),
            result.input_ids, result.positions, result.slot_mapping, result.cu_seqlens_q, result.context_lens,
            result.block_tables, result.logits_indices]
    return _KERNEL_NAMES[token_ids.dtype], -(-num_threads // THREADS_PER_BLOCK), args


def _build_cuda(desc: StepDescription, device_desc: torch.Tensor, token_ids: torch.Tensor,
                block_tables: torch.Tensor, block_size: int, result: FlatBatch) -> None:
    import cupy

    if not result.block_tables.is_contiguous():
        raise ValueError("the kernel writes block_tables as a contiguous [B, max_blocks] array")
    name, num_blocks, args = launch_plan(desc, device_desc, token_ids, block_tables, block_size, result)
    device = token_ids.device
    with cupy.cuda.Device(device.index):
        kernel = _kernel(device.index, name)
        # cupy's current stream = torch's, so DLPack adds no cross-stream event and the launch
        # is ordered after the description's copy.
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            # An empty output (no sampled rows) goes as None, a null pointer: the kernel never writes it.
            launch_args = tuple(arg if not isinstance(arg, torch.Tensor) else
                                cupy.from_dlpack(arg) if arg.numel() else None for arg in args)
            kernel((num_blocks,), (THREADS_PER_BLOCK,), launch_args)


@functools.cache
def _kernel(device_index: int, name: str):
    """The compiled kernel for this device (NVRTC, once per process and device)."""
    import cupy

    with cupy.cuda.Device(device_index):
        kernel = cupy.RawModule(code=SOURCE.read_text()).get_function(name)
        if kernel.max_threads_per_block < THREADS_PER_BLOCK:  # reading it compiles and loads the module now
            raise RuntimeError(f"{name} allows {kernel.max_threads_per_block} threads per block, "
                               f"the launcher uses {THREADS_PER_BLOCK}")
        return kernel


@functools.cache
def cuda_unavailable_reason(device: torch.device | None = None) -> str | None:
    """None when the CUDA kernel can run on `device` (default: the current CUDA device), else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import cupy  # noqa: F401  (cupy-cuda12x and cupy-cuda13x both provide it)
    except ImportError as error:
        return f"cupy is not installed ({error})"
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    try:
        for name in _KERNEL_NAMES.values():
            _kernel(index, name)
    except Exception as error:  # NVRTC missing or failing: say so, serve with torch
        log.warning("the CUDA batching core does not load, using torch: %s", error)
        return f"the kernel does not compile or load: {error}"
    return None
