"""RMSNorm, optionally fused with the residual add that precedes it.

Shapes: x [N, H], residual [N, H] or None, weight [H]. The statistics are taken in float32 and the
result is cast back to x's dtype before the weight multiplies it, as Hugging Face's LlamaRMSNorm
does, so that low-precision models match their reference bit for bit where possible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual) where new_residual = x + residual (or x when none is given).

    The decoder layer feeds new_residual to the next norm: one fused call replaces "add, then norm".
    """
    if residual is not None:
        x = x + residual
    x_f32 = x.to(torch.float32)
    variance = x_f32.pow(2).mean(-1, keepdim=True)
    normed = (x_f32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, x


def rmsnorm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rmsnorm_ref` in one fused call where that is the same arithmetic: for float32, torch's
    `rms_norm` computes exactly the reference's float32 statistics and products (bit-identical on
    CPU), in one pass instead of seven (2x faster for a decode step's rows). Other dtypes round
    twice in the reference (before and after the weight) and keep it."""
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        return rmsnorm_ref(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    return torch.nn.functional.rms_norm(x, weight.shape, weight, eps), x


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row. The row (H <= 65536 elements) is held in registers whole, so
# x (and residual) are read once and the output (and the sum) written once, where the reference
# runs ~7 kernels that each pass over the row. The rounding steps of `rmsnorm_ref` are
# kept: x + residual is rounded to x's dtype (that rounded sum is both the new residual and what
# the statistics see), the normalised row is rounded to x's dtype before the weight multiplies it,
# and that product is rounded to the output dtype (torch's promotion of weight and x). Products of
# two float16/bfloat16 values are exact in float32, so only the mean's summation order differs.
# ---------------------------------------------------------------------------------------------

MAX_FUSED_ROW = 65536  # elements one program holds in registers


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    stride_x, stride_residual, stride_out, stride_sum,  # row strides (elements); columns are contiguous
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x_rounded = (x + r).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x_rounded, mask=mask)
        x = x_rounded.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / H
    normed = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def row_launch_settings(num_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one row of num_cols elements in registers: about
    8 elements per thread for wide rows, so a 4096-wide row takes 16 warps' worth of 16-byte loads."""
    block = triton.next_power_of_2(num_cols)
    return block, min(max(block // 256, 1), 16)


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")
    return t if t.stride(-1) == 1 else t.contiguous()


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rmsnorm_ref` in one kernel launch: (x [N, H], weight [H], eps, residual [N, H] | None) ->
    (normed, x + residual). Rows may be strided (a view of a wider buffer); with no residual the
    second result is x itself, as in the reference."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    num_rows, hidden = x.shape
    if hidden > MAX_FUSED_ROW:
        raise ValueError(f"hidden size {hidden} exceeds the fused kernel's {MAX_FUSED_ROW}")
    if weight.shape != (hidden,) or weight.device != x.device:
        raise ValueError(f"weight must be [{hidden}] on {x.device}, got {list(weight.shape)} on {weight.device}")
    x = _check_rows("x", x, (num_rows, hidden), x.device)
    weight = weight.contiguous()
    out = torch.empty((num_rows, hidden), dtype=torch.result_type(weight, x), device=x.device)
    has_residual = residual is not None
    if has_residual:
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        residual = _check_rows("residual", residual, (num_rows, hidden), x.device)
        summed = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    else:
        residual, summed = x, x  # not read or written: HAS_RESIDUAL is off
    if num_rows == 0:
        return out, summed
    block, num_warps = row_launch_settings(hidden)
    _rmsnorm_kernel[(num_rows,)](
        x, residual, weight, out, summed,
        x.stride(0), residual.stride(0), out.stride(0), summed.stride(0),
        hidden, float(eps),
        HAS_RESIDUAL=has_residual, BLOCK_H=block, num_warps=num_warps,
    )
    return out, summed
