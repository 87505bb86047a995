"""Weight and KV-cache dtypes of a served LLM: what each name means and how a loaded model gets it.

Names (a version's config `weight_dtype` / `kv_cache_dtype`, or the worker's flags):
- float32, float16, bfloat16: every weight in that dtype, and the step computes in it. On CPU the
  linear weights are reordered once for oneDNN (kernels/linear_cpu.py; bf16 runs on AVX512-BF16 or
  AMX where the CPU has them).
- int8: weight-only, per-output-channel scales (kernels/quant_linear.py), every projection of every
  layer and the LM head; activations in the compute dtype: bfloat16 unless `dtype` says float32 (the
  kernels' fast path is bfloat16 activations).
- int4: weight-only, group-wise (32 inputs a group, llama.cpp's Q4 block) for the layers' projections;
  the LM head (and so a tied embedding) is int8: it is a fifth of a small model's weights and its
  logits decide every greedy token.
The token embedding follows the head: int8 rows when tied to an int8 head, else the compute dtype.
RMSNorm weights stay in the compute dtype, the rope tables in float32: they are a few KB.
The KV cache takes `kv_cache_dtype`, by default the compute dtype; attention then runs in the cache's
dtype (queries are cast to it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from kernels.quant_linear import INT4_GROUP_SIZE, Int4Linear, Int8Embedding, Int8Linear, PromptRows

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZED = ("int8", "int4")
WEIGHT_DTYPES = ("auto", *FLOAT_DTYPES, *QUANTIZED)
KV_CACHE_DTYPES = ("auto", *FLOAT_DTYPES)


@dataclass(frozen=True, slots=True)
class ResolvedDtypes:
    weight_dtype: str  # a name of WEIGHT_DTYPES other than "auto"
    compute_dtype: torch.dtype  # activations, norms, unquantized weights
    kv_cache_dtype: torch.dtype

    @property
    def kv_cache_dtype_name(self) -> str:
        return dtype_name(self.kv_cache_dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve(dtype: str, weight_dtype: str, kv_cache_dtype: str, checkpoint_dtype: torch.dtype) -> ResolvedDtypes:
    """The engine's three dtypes from its config; "auto" follows the checkpoint (weights), then the
    compute dtype (cache). A float weight dtype is also the compute dtype, so `dtype` may not differ."""
    if weight_dtype == "auto":
        weight_dtype = dtype if dtype != "auto" else dtype_name(checkpoint_dtype)
    if weight_dtype in FLOAT_DTYPES:
        if dtype not in ("auto", weight_dtype):
            raise ValueError(f"dtype {dtype!r} and weight_dtype {weight_dtype!r} differ; float weights compute "
                             "in their own dtype (set one of them)")
        compute = FLOAT_DTYPES[weight_dtype]
    else:
        # The weight-only kernels take float32 or bfloat16 activations; bfloat16 is their fast path
        # (with float32 activations torch 2.13 computes row by row: 50x slower at 32 rows, docs/ENGINE.md).
        compute = FLOAT_DTYPES[dtype] if dtype != "auto" else torch.bfloat16
        if compute not in (torch.float32, torch.bfloat16):
            raise ValueError(f"weight_dtype {weight_dtype!r} computes in float32 or bfloat16, not dtype {dtype!r}")
    kv = FLOAT_DTYPES[kv_cache_dtype] if kv_cache_dtype != "auto" else compute
    return ResolvedDtypes(weight_dtype, compute, kv)


def quantize_model(model: nn.Module, weight_dtype: str, compute_dtype: torch.dtype,
                   group_size: int = INT4_GROUP_SIZE) -> int:
    """Swaps the decoder layers' linear layers and the LM head of a loaded (float) LlamaForCausalLM for
    weight-only int8/int4 ones, in place; returns how many layers were swapped. The float weights are
    dropped as each layer is replaced, so peak memory grows by one layer, not by a model."""
    from services.worker.models.llama import Linear  # the model module imports this one's names lazily

    if weight_dtype not in QUANTIZED:
        raise ValueError(f"weight_dtype must be one of {QUANTIZED}, got {weight_dtype!r}")
    swapped = 0
    model.prompt_rows = PromptRows()  # planned by the runner each step (see PromptRows)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, _quantized(child, weight_dtype, compute_dtype, group_size,
                                                     model.prompt_rows))
                    swapped += 1
    embedding = model.model.embed_tokens
    head_weight = embedding.weight if model.lm_head is None else model.lm_head.weight
    head = Int8Linear.from_float(head_weight, None, compute_dtype)
    if model.lm_head is None:  # tied: one int8 matrix serves the lookup and the head
        model.model.embed_tokens = Int8Embedding(head)
    else:
        embedding.weight.data = embedding.weight.data.to(compute_dtype)
    model.lm_head = head
    return swapped + 1


def _quantized(layer: nn.Module, weight_dtype: str, compute_dtype: torch.dtype, group_size: int,
               prompt_rows: PromptRows) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach()
    if weight_dtype == "int4" and layer.weight.shape[1] % group_size == 0:
        return Int4Linear.from_float(layer.weight, bias, compute_dtype, group_size)
    return Int8Linear.from_float(layer.weight, bias, compute_dtype, prompt_rows)  # int8, or int4 off the grid


def resident_bytes_by_dtype(module: nn.Module) -> dict[str, int]:
    """Bytes of a model's weight tensors by storage dtype (parameters and the tensors layers hold as
    plain attributes: packed and quantized weights, scales), each tensor once."""
    seen: set[int] = set()
    totals: dict[str, int] = defaultdict(int)
    for layer in module.modules():
        for value in (*layer._parameters.values(), *vars(layer).values()):
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                totals[dtype_name(value.dtype)] += value.numel() * value.element_size()
    return dict(totals)
