"""The ops interface: the few kernels the model calls, and the backend that provides them.

Model code calls `ops.rmsnorm`, `ops.rope`, `ops.silu_and_mul`, `ops.write_kv` and
`ops.paged_attention` on an `Ops` it is given, never a kernel module directly, so the Triton backend
swaps in with no change to the model or the engine. `torch` is the reference implementations in this
package (CPU or CUDA); `triton` is provided by `kernels.triton_backend.make_ops()` when that module
exists and CUDA is present. `cpu` is torch with the decode rows of paged attention in the compiled
CPU kernel (`kernels/paged_decode_cpu.py`, built by `scripts/setup`). `auto` takes triton where it
can, else cpu where the kernel is built and loads, else torch: `torch` stays the reference and the
fallback, and choosing it explicitly switches the kernel off.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")


@dataclass(slots=True)
class AttentionMetadata:
    """How the step's flat batch maps onto sequences and the paged cache (built by the runner)."""

    slot_mapping: torch.Tensor  # [N] int64: cache slot (block_id * block_size + offset) of each new token
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: new tokens of sequence b are rows cu[b]:cu[b + 1]
    context_lens: torch.Tensor  # [B] int32: tokens of sequence b in the cache once this step's are written
    block_tables: torch.Tensor  # [B, max_blocks] int32: cache blocks of sequence b, padded with 0
    max_seqlen_q: int  # host copies of the maxima, so launchers size grids without a device sync
    max_context_len: int
    # What a backend derives from the fields above once per step and reuses in every layer (index
    # tensors, masks): set by `Ops.plan_step` before the forward pass, never by the runner itself.
    backend_plan: object | None = None


@dataclass(frozen=True, slots=True)
class StepHost:
    """The step's batch as host ints, which the runner has before the forward pass: a backend plans
    from these, so no layer reads the device's copies back (a host sync, and none is allowed inside
    a CUDA graph)."""

    cu_seqlens_q: list[int]  # [B + 1]: the host twin of AttentionMetadata.cu_seqlens_q
    context_lens: list[int]  # [B]
    # [B]: how many of sequence b's rows are prompt tokens (they come first: positions are in order);
    # empty where nobody said (every row is then taken for a generated token).
    num_prompt_rows: list[int] = field(default_factory=list)


def _no_plan(metadata: AttentionMetadata, host: StepHost, positions: torch.Tensor, k_cache: torch.Tensor) -> None:
    """The plan_step of a backend that needs none: its kernels read the metadata's tensors directly."""


@dataclass(frozen=True, slots=True)
class Ops:
    name: str
    # (x [N, H], weight [H], eps, residual [N, H] | None) -> (normed, x + residual)
    rmsnorm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (q [N, Hq, D], k [N, Hkv, D], positions [N], cos_sin_cache [P, D]) -> (q, k) rotated
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # [N, 2I] -> [N, I]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # (k, v [N, Hkv, D], k_cache, v_cache, slot_mapping [N]) -> None, in place
    write_kv: Callable[..., None]
    # (q [N, Hq, D], k_cache, v_cache, AttentionMetadata, scale, sliding_window) -> [N, Hq, D]
    paged_attention: Callable[..., torch.Tensor]
    # (metadata, StepHost, positions [N], k_cache of any layer) -> None: once per step, before the
    # forward pass; fills metadata.backend_plan and renews what the ops keep per step (RoPE tables).
    plan_step: Callable[[AttentionMetadata, StepHost, torch.Tensor, torch.Tensor], None] = _no_plan
    # (logits [S, V] float32, temperature, top_k, top_p, min_p, seeds, offsets [S] each,
    # use_top_k_top_p=) -> tokens [S] int64, drawn on the device (kernels/sampling.py's `sample`).
    # None: the engine samples with its host sampler (services/worker/engine/sampler.py).
    sample: Callable[..., torch.Tensor] | None = None


def torch_ops() -> Ops:
    from kernels.activation import silu_and_mul_ref
    from kernels.attention_torch import paged_attention_torch, plan_torch
    from kernels.kv_write import write_kv_ref
    from kernels.rmsnorm import rmsnorm_torch
    from kernels.rope import RopeTorch

    rope = RopeTorch()  # one per Ops, so per model: it keeps the step's tables

    def plan_step(metadata: AttentionMetadata, host: StepHost, positions: torch.Tensor, k_cache: torch.Tensor) -> None:
        rope.begin_step(positions)
        plan_torch(metadata, host, k_cache)

    return Ops(
        name="torch",
        rmsnorm=rmsnorm_torch,
        rope=rope,
        silu_and_mul=silu_and_mul_ref,
        write_kv=write_kv_ref,
        paged_attention=paged_attention_torch,
        plan_step=plan_step,
    )


def cpu_ops() -> Ops | None:
    """torch_ops with the compiled CPU decode kernel, or None where it is not built or does not load."""
    from kernels import paged_decode_cpu
    from kernels.attention_torch import paged_attention_cpu, plan_cpu

    if paged_decode_cpu.load() is None:
        return None
    ops = torch_ops()
    rope = ops.rope

    def plan_step(metadata: AttentionMetadata, host: StepHost, positions: torch.Tensor, k_cache: torch.Tensor) -> None:
        rope.begin_step(positions)
        plan_cpu(metadata, host, k_cache)

    return replace(ops, name="cpu", paged_attention=paged_attention_cpu, plan_step=plan_step)


def _triton_ops(explicit: bool = False) -> Ops | None:
    """The Triton backend, or None where it cannot run (no CUDA, no triton). Asked for explicitly
    under `TRITON_INTERPRET=1`, it runs on the CPU through triton's interpreter (tests only: slow)."""
    interpreted = explicit and os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreted:
        return None
    try:
        module = importlib.import_module("kernels.triton_backend")
    except ImportError:
        return None
    return module.make_ops()


def get_ops(backend: str = "auto") -> Ops:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return torch_ops()
    if backend != "cpu":
        ops = _triton_ops(explicit=backend == "triton")
        if ops is not None:
            return ops
        if backend == "triton":
            raise ValueError("backend 'triton' needs CUDA, the triton package and kernels.triton_backend")
    ops = cpu_ops()
    if ops is not None:
        return ops
    if backend == "cpu":
        from kernels import paged_decode_cpu

        raise ValueError(f"backend 'cpu' needs the CPU decode kernel: {paged_decode_cpu.unavailable_reason()}")
    return torch_ops()
