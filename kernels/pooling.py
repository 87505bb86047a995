"""Mean pooling for encoders, optionally L2-normalised, as sentence-transformers' Pooling (mean)
and Normalize modules compute it.

Two layouts of the same thing:
- padded: hidden [B, L, H] with attention_mask [B, L] (1 for tokens, 0 for padding), what
  services/worker/models/sentence_encoder.py runs today: sum(hidden * mask) / max(sum(mask), 1e-9);
- varlen: hidden [N, H], the sequences' tokens back to back, sequence b in rows
  cu_seqlens[b]:cu_seqlens[b + 1] (the engine's flat batch), each divided by its length (an empty
  sequence pools to zeros, as a fully masked padded row does).
Either way the result is [B, H] float32 (the encoder pools in float32 whatever its compute dtype),
and with normalize=True each row is divided by max(||row||_2, 1e-12), as F.normalize does.

Kernel: one program per sequence holds the whole hidden row (BLOCK_H = next power of two >= H, so
the norm needs no second pass) and walks the sequence BLOCK_L tokens at a time, accumulating in
float32; a program reads its tokens once and writes H floats. Encoders have H <= 1024 or so; the
launcher refuses H past MAX_HIDDEN_SIZE rather than spill registers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_HIDDEN_SIZE = 8192
_TILE_ELEMENTS = 8192  # BLOCK_L * BLOCK_H: one chunk of tokens in registers
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------- references

def mean_pool_ref(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """[B, L, H] and mask [B, L] -> [B, H] float32: the encoder's own pooling (sentence_encoder.py)."""
    mask = attention_mask.unsqueeze(-1).float()  # [B, L, 1]
    pooled = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def mean_pool_varlen_ref(hidden: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """[N, H] flat over sequences and cu_seqlens [B + 1] -> [B, H] float32."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    first = int(cu_seqlens[0])
    sequence_of_row = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    rows = hidden[first:first + len(sequence_of_row)].float()
    sums = torch.zeros(len(lengths), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    pooled = sums.index_add_(0, sequence_of_row, rows) / lengths.float().clamp(min=1e-9)[:, None]
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


# ----------------------------------------------------------------------------------- kernel

@triton.jit
def _mean_pool_kernel(
    hidden_ptr, stride_sequence, stride_token, hidden_size,  # token t of sequence b: b * s_seq + t * s_tok
    mask_ptr, stride_mask_sequence,  # [B, L] float32 (padded layout only)
    cu_seqlens_ptr,  # [B + 1] (varlen layout only)
    num_tokens,  # L (padded layout only)
    out_ptr,  # [B, H] float32, contiguous
    VARLEN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):
    sequence = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < hidden_size
    tokens = tl.arange(0, BLOCK_L)
    if VARLEN:
        # int32 loop bounds (a batch has < 2**31 tokens); offsets below are widened to int64
        start = tl.load(cu_seqlens_ptr + sequence).to(tl.int32)
        end = tl.load(cu_seqlens_ptr + sequence + 1).to(tl.int32)
        base = hidden_ptr
    else:
        start = 0
        end = num_tokens
        base = hidden_ptr + sequence.to(tl.int64) * stride_sequence
    total = tl.zeros([BLOCK_H], tl.float32)
    weight = tl.zeros([BLOCK_L], tl.float32)  # per-lane token counts (mask sums), reduced at the end
    for first in range(start, end, BLOCK_L):
        token = first + tokens
        token_ok = token < end
        if VARLEN:
            token_weight = tl.where(token_ok, 1.0, 0.0)
        else:
            token_weight = tl.load(mask_ptr + sequence.to(tl.int64) * stride_mask_sequence + token, mask=token_ok,
                                   other=0.0)
        offsets = token.to(tl.int64)[:, None] * stride_token + cols[None, :]
        x = tl.load(base + offsets, mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(x * token_weight[:, None], axis=0)
        weight += token_weight
    pooled = total / tl.maximum(tl.sum(weight, axis=0), 1e-9)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(pooled * pooled, axis=0))
        pooled = pooled / tl.maximum(norm, 1e-12)
    tl.store(out_ptr + sequence.to(tl.int64) * hidden_size + cols, pooled, mask=col_ok)


# ----------------------------------------------------------------------------------- launchers

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """`mean_pool_ref` on the device: hidden [B, L, H] float32/float16/bfloat16, attention_mask
    [B, L] (integer, bool or float) -> [B, H] float32."""
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [B, L, H], got shape {tuple(hidden.shape)}")
    _check_hidden(hidden)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be [B, L] = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, hidden on {hidden.device}")
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    mask = attention_mask.to(torch.float32).contiguous()  # [B, L]: the weights the reference multiplies by
    num_sequences, num_tokens, hidden_size = hidden.shape
    out = torch.empty(num_sequences, hidden_size, dtype=torch.float32, device=hidden.device)
    if num_sequences:
        block_l, block_h = _blocks(hidden_size)
        _mean_pool_kernel[(num_sequences,)](
            hidden, hidden.stride(0), hidden.stride(1), hidden_size, mask, mask.stride(0), mask, num_tokens, out,
            VARLEN=False, NORMALIZE=normalize, BLOCK_L=block_l, BLOCK_H=block_h,
        )
    return out


def mean_pool_varlen(hidden: torch.Tensor, cu_seqlens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """`mean_pool_varlen_ref` on the device: hidden [N, H], cu_seqlens [B + 1] int32/int64
    (non-decreasing, cu_seqlens[-1] <= N: not checked, that would wait for the device) -> [B, H] float32."""
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    _check_hidden(hidden)
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be [B + 1] int32 or int64, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, hidden on {hidden.device}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    num_sequences, hidden_size = cu_seqlens.shape[0] - 1, hidden.shape[1]
    out = torch.empty(num_sequences, hidden_size, dtype=torch.float32, device=hidden.device)
    if num_sequences:
        block_l, block_h = _blocks(hidden_size)
        _mean_pool_kernel[(num_sequences,)](
            hidden, 0, hidden.stride(0), hidden_size, out, 0, cu_seqlens, 0, out,
            VARLEN=True, NORMALIZE=normalize, BLOCK_L=block_l, BLOCK_H=block_h,
        )
    return out


def _check_hidden(hidden: torch.Tensor) -> None:
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if not 1 <= hidden.shape[-1] <= MAX_HIDDEN_SIZE:
        raise ValueError(f"hidden size must be in [1, {MAX_HIDDEN_SIZE}], got {hidden.shape[-1]}")


def _blocks(hidden_size: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_H): the whole hidden row, and as many tokens as fit in one tile."""
    block_h = triton.next_power_of_2(hidden_size)
    return max(1, min(64, _TILE_ELEMENTS // block_h)), block_h
