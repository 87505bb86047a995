"""Gated MLP activations: x [N, 2 * I] holds gate || up (the fused gate_up projection) -> [N, I].

SiLU gates Llama-family MLPs; GELU gates GeGLU ones (Gemma: the tanh approximation; some T5-family
models: the exact erf form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GELU_APPROXIMATIONS = ("tanh", "none")


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[N, 2 * I] -> [N, I]: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[N, 2 * I] -> [N, I]: gelu(gate, approximate="tanh") * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[N, 2 * I] -> [N, I]: gelu(gate) * up, the exact (erf) GELU."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate) * up


# Grid (rows, column blocks of BLOCK): each program reads BLOCK gate and BLOCK up elements and
# writes BLOCK outputs, so a row of any width is covered without holding it whole. The activation
# is computed in float32 and rounded to x's dtype before the multiply, as torch rounds F.silu's /
# F.gelu's result before `* up`; that product of two 16-bit floats is exact in float32, so the
# kernel matches the reference up to the activation's own last-bit rounding.
# tanh is written through the sigmoid (0.5 (1 + tanh u) = sigmoid(2u)): tl has no tanh in every
# triton version we run, and the sigmoid form does not overflow for large |u|.
SILU, GELU_TANH, GELU_ERF = 0, 1, 2
_KINDS = {"silu": SILU, "gelu_tanh": GELU_TANH, "gelu": GELU_ERF}


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, I, KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        act = gate * tl.sigmoid(gate)
    elif KIND == 1:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) (x + 0.044715 x^3)
        act = gate * tl.sigmoid(2.0 * inner)
    else:
        act = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    act = act.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, kind: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [N, 2 * I] (gate || up), got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, intermediate), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # 1024 columns a program (8 per thread at 4 warps): a decode step's single row of I = 14336
    # still spreads over 14 programs, and a long prefill's grid stays well within limits.
    block = min(1024, triton.next_power_of_2(intermediate))
    grid = (num_rows, triton.cdiv(intermediate, block))
    _act_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), intermediate,
                              KIND=_KINDS[kind], BLOCK=block, num_warps=4)
    return out


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul_ref` in one kernel launch; rows of x may be strided."""
    return _act_and_mul(x, "silu")


def gelu_and_mul_triton(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """`gelu_tanh_and_mul_ref` (approximate="tanh") or `gelu_and_mul_ref` ("none") in one launch."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return _act_and_mul(x, "gelu_tanh" if approximate == "tanh" else "gelu")
