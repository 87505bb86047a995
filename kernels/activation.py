"""SiLU-gated MLP activation: x [N, 2 * I] holds gate || up (the fused gate_up projection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[N, 2 * I] -> [N, I]: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
