"""Rotary position embedding, "neox" layout (rotate the two halves of each head), as Llama uses.

Shapes: q [N, num_heads, head_dim], k [N, num_kv_heads, head_dim], positions [N] (int64),
cos_sin_cache [max_positions, head_dim]: row p holds cos(p * inv_freq) in its first half and
sin(p * inv_freq) in its second half, float32. RoPE scaling (linear, llama3) is folded into
inv_freq when the cache is built, so every scaling type shares this one kernel.
"""

from __future__ import annotations

import torch


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_factor: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32 table read by `rope_ref`; inv_freq is [head_dim // 2]."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.to(torch.float32))  # [max_positions, head_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated (q, k); inputs are left untouched."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [N, head_dim // 2] each
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)  # [N, 1, head_dim]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RopeTorch:
    """`rope_ref` with the cos/sin rows gathered once per step, not once per layer.

    Every layer of a step passes the same `positions` tensor; the last one seen is kept (a
    reference, so its identity cannot be reused by another tensor) with its tables."""

    def __init__(self) -> None:
        self._positions: torch.Tensor | None = None
        self._cache: torch.Tensor | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is not self._positions or cos_sin_cache is not self._cache or self._tables[0].dtype != q.dtype:
            cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [N, head_dim // 2] each
            self._tables = (torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype),  # [N, 1, head_dim]
                            torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype))
            self._positions, self._cache = positions, cos_sin_cache
        cos, sin = self._tables
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
