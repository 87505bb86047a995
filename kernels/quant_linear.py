"""Weight-only int8 and int4 linear layers for the CPU: quantizers, layers and torch references.

int8: symmetric, one scale per output channel (row): w[n, k] ~= q[n, k] * scale[n], q in [-127, 127].
    Layer: `torch.ops.aten._weight_int8pack_mm(x [M, K], q [N, K] int8, scale [N])`, which takes
    the plain row-major int8 matrix (nothing to reorder) and reads one byte per weight.
int4: asymmetric, one (scale, min) pair per group of `group_size` inputs of a row:
    w[n, k] ~= q[n, k] * scale[n, g] + min[n, g], q in [0, 15], g = k // group_size.
    Group 32 with min/max scaling is llama.cpp's Q4_1 block exactly: a weight dequantized from a
    Q4_1 block spans [min, min + 15 * scale] with both ends taken, so re-quantizing it here gives
    back the block's own codes, scale and min: the model served is the GGUF's, except that scale
    and min are then stored in the activation dtype (bfloat16 by default, which rounds them).
    Layer: `torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`
    with the codes reordered once by `_convert_weight_to_int4pack_for_cpu` (half a byte a weight)
    and scales_and_zeros [K / group_size, N, 2] in tinygemm's convention w = (q - 8) * scale + zero,
    i.e. zero = min + 8 * scale. Where a build lacks those ops the layer keeps the codes two to a
    byte in its own layout and dequantizes them on every call: slower, same resident bytes.

Prompt rows of a step take another way through an int8 layer, chosen per row (`PromptRows`).

`*_ref` functions are the specification the tests compare the layers against. Activations stay in
the dtype the layer is built for (float32 or bfloat16): the scales are stored in it because the
packed kernels take them in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32  # inputs per (scale, min) pair: llama.cpp's Q4_0/Q4_1 block size


def has_int8_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def has_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


# -- int8 -------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] int8, scale [N] float32), symmetric per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_ref(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class PromptRows:
    """Which rows of a step are prompt tokens, for the int8 layers of one model (set per step by the
    runner through `plan`, used by the next forward pass only).

    int8 weight-only has two ways through a layer on this CPU with opposite strengths. The packed
    kernel (`_weight_int8pack_mm`) reads one byte a weight, the fast path for the few rows of a decode
    step, but works row by row: SmolLM2's decoder layers take 467 ms on a 167-token prompt. Converting
    the int8 weight to bfloat16 and running oneDNN's bf16 GEMM (scale on the output) takes 140 ms for
    it, against 127 ms with bf16 weights: the conversion is paid once per call, whatever the rows.
    The two round differently, so which one computes a row must be a property of the row, not of the
    batch, or batching would change tokens: a prompt token takes the GEMM, a generated token (decoded,
    or recomputed after a preemption or a resume) the packed kernel, alone, batched, chunked or not.
    """

    def __init__(self) -> None:
        self.num_rows = -1  # of the planned step; -1: no plan (every row takes the packed kernel)
        self.num_prompt = 0
        self.prompt_index: torch.Tensor | None = None  # [P] int64, where prompt and generated rows mix
        self.generated_index: torch.Tensor | None = None

    def plan(self, cu_seqlens: list[int], num_prompt_rows: list[int], device: torch.device) -> None:
        """Sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1], its first num_prompt_rows[b] prompt tokens."""
        self.num_rows, self.num_prompt = cu_seqlens[-1], sum(num_prompt_rows)
        self.prompt_index = self.generated_index = None
        if 0 < self.num_prompt < self.num_rows:
            prompt = [r for b, p in enumerate(num_prompt_rows) for r in range(cu_seqlens[b], cu_seqlens[b] + p)]
            generated = [r for b, p in enumerate(num_prompt_rows) for r in range(cu_seqlens[b] + p, cu_seqlens[b + 1])]
            self.prompt_index = torch.tensor(prompt, dtype=torch.int64, device=device)
            self.generated_index = torch.tensor(generated, dtype=torch.int64, device=device)

    def clear(self) -> None:
        self.num_rows = -1

    def of(self, num_rows: int) -> str:
        """"prompt", "generated" or "mixed" for a call on num_rows rows (unplanned: "generated")."""
        if num_rows != self.num_rows or self.num_prompt == 0:
            return "generated"
        return "prompt" if self.num_prompt == num_rows else "mixed"


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, reading one byte per weight (rows of prompt tokens: see PromptRows)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 prompt_rows: PromptRows | None = None):
        super().__init__()
        self.weight_int8 = q.contiguous()  # [N, K] int8
        self.scale = scale.to(dtype).contiguous()  # [N], in the activation dtype (the kernel's contract)
        self.bias = None if bias is None else bias.detach().to(dtype)
        # The model's row split; None (the LM head, whose rows are the step's sampling rows, and any
        # layer used on its own): every row takes the packed kernel.
        self.prompt_rows = prompt_rows

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   prompt_rows: PromptRows | None = None) -> Int8Linear:
        q, scale = quantize_int8(weight)
        return cls(q, scale, bias, dtype, prompt_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scale.dtype)
        if not (has_int8_kernel() and x2.device.type == "cpu"):  # the reference: dequantize per call
            y = F.linear(x2, (self.weight_int8.to(x2.dtype) * self.scale[:, None]))
        else:
            kind = "generated" if self.prompt_rows is None else self.prompt_rows.of(x2.shape[0])
            if kind == "generated":
                y = self._packed(x2)
            elif kind == "prompt":
                y = self._converted(x2)
            else:
                rows = self.prompt_rows
                y = x2.new_empty(x2.shape[0], self.weight_int8.shape[0])
                y[rows.prompt_index] = self._converted(x2[rows.prompt_index])
                y[rows.generated_index] = self._packed(x2[rows.generated_index])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], y.shape[-1])

    def _packed(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)

    def _converted(self, x2: torch.Tensor) -> torch.Tensor:
        """The bf16 GEMM on the weight converted for this call (int8 values are exact in bfloat16)."""
        return F.linear(x2.contiguous(), self.weight_int8.to(x2.dtype)) * self.scale


class Int8Embedding(nn.Module):
    """Token lookup from the same int8 rows and scales an `Int8Linear` head reads (tied weights):
    the rows of the step's tokens are dequantized, nothing else."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.weight_int8 = head.weight_int8  # the same tensors: counted once in the resident bytes
        self.scale = head.scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[input_ids]  # [N, H] int8
        return rows.to(self.scale.dtype) * self.scale[input_ids, None]


# -- int4 -------------------------------------------------------------------------------------------


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] int32 in 0..15, scale [N, K/G] float32, min [N, K/G] float32)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs in_features ({k}) to be a multiple of group_size ({group_size})")
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, low


def dequantize_int4_ref(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    w = q.view(n, k // group_size, group_size).float() * scale[..., None] + low[..., None]
    return w.view(n, k)


class Int4Linear(nn.Module):
    """y = x @ dequant(q).T + bias with the codes at half a byte per weight (see the module notes)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE, use_kernel: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.use_kernel = has_int4_kernel() if use_kernel is None else use_kernel
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype = dtype
        if self.use_kernel:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # [N, K/2] uint8
            zero = low + 8.0 * scale
            # [K/G, N, 2]: the kernel walks groups outermost.
            self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        else:
            codes = q.to(torch.uint8)
            self.packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # [N, K/2]: even k low nibble
            self.scales_and_zeros = torch.stack([scale, low], dim=-1).to(dtype).contiguous()  # [N, K/G, 2]

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   group_size: int = INT4_GROUP_SIZE, use_kernel: bool | None = None) -> Int4Linear:
        q, scale, low = quantize_int4(weight, group_size)
        return cls(q, scale, low, bias, dtype, group_size, use_kernel)

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] in the activation dtype, from the fallback layout (the dequantize-per-call path)."""
        low_nibble, high_nibble = self.packed & 0x0F, self.packed >> 4
        codes = torch.stack([low_nibble, high_nibble], dim=-1).view(self.out_features, -1, self.group_size)
        scale, low = self.scales_and_zeros[..., 0], self.scales_and_zeros[..., 1]
        return (codes.to(self.dtype) * scale[..., None] + low[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.dtype)
        if self.use_kernel:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                           self.scales_and_zeros)
        else:
            y = F.linear(x2, self.dequantized_weight())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)
