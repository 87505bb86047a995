"""LayerNorm, optionally fused with the residual add that precedes it.

Shapes: x [N, H], residual [N, H] or None, weight [H] or None, bias [H] or None. The result is
`torch.nn.functional.layer_norm(x + residual, (H,), weight, bias, eps)` in x's dtype, statistics in
float32 (mean, then the biased variance), as torch computes it for float16/bfloat16 inputs.

Encoders of the BERT family are post-norm: each sublayer ends in `LayerNorm(hidden + sublayer(h))`
(services/worker/models/bert.py: `attention_norm(hidden + attention_out(...))`, `mlp_norm(hidden +
mlp_out(...))`) and the next sublayer reads the normed row, never the sum, so the launcher can skip
writing the sum (`keep_sum=False`): one row pass less. Pre-norm models keep it, as with RMSNorm.
The embeddings' norm has no residual: `layernorm(hidden, w, b, eps)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.rmsnorm import MAX_FUSED_ROW, row_launch_settings


def layernorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual) where new_residual = x + residual (or x when none is given)."""
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps), x


# One program per row, held in registers whole: x (and residual) read once, the output (and the
# sum, if kept) written once. x + residual is rounded to x's dtype first, as the reference's add
# is, and the statistics are taken over that rounded sum; the two-pass variance (mean first) is
# computed from registers, so it costs no second read.
@triton.jit
def _layernorm_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, sum_ptr,
    stride_x, stride_residual, stride_out, stride_sum,  # row strides (elements); columns are contiguous
    H, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x_rounded = (x + r).to(x_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(sum_ptr + row * stride_sum + cols, x_rounded, mask=mask)
        x = x_rounded.to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    centered = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / H
    y = centered * tl.rsqrt(variance + eps)
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_param(name: str, t: torch.Tensor | None, hidden: int, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.shape != (hidden,) or t.device != device:
        raise ValueError(f"{name} must be [{hidden}] on {device}, got {list(t.shape)} on {t.device}")
    return t.contiguous()


def layernorm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    keep_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`layernorm_ref` in one kernel launch: -> (normed [N, H] in x's dtype, x + residual).

    With a residual and keep_sum=False the sum is not written and the second result is None (the
    post-norm encoder's case). Without a residual the second result is x itself."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    num_rows, hidden = x.shape
    if hidden > MAX_FUSED_ROW:
        raise ValueError(f"hidden size {hidden} exceeds the fused kernel's {MAX_FUSED_ROW}")
    weight = _check_param("weight", weight, hidden, x.device)
    bias = _check_param("bias", bias, hidden, x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    has_residual = residual is not None
    if has_residual:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x ({list(x.shape)}, {x.dtype}, {x.device}), got "
                             f"{list(residual.shape)}, {residual.dtype}, {residual.device}")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        summed = torch.empty_like(out) if keep_sum else None
    else:
        residual, summed = x, x  # not read or written
    if num_rows == 0:
        return out, summed
    block, num_warps = row_launch_settings(hidden)
    sum_arg = summed if summed is not None else out  # never written when STORE_SUM is off
    _layernorm_kernel[(num_rows,)](
        x, residual, weight if weight is not None else out, bias if bias is not None else out, out, sum_arg,
        x.stride(0), residual.stride(0), out.stride(0), sum_arg.stride(0),
        hidden, float(eps),
        HAS_RESIDUAL=has_residual, STORE_SUM=has_residual and keep_sum,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_H=block, num_warps=num_warps,
    )
    return out, summed
