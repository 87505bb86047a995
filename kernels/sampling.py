"""Sampling on the device: from a step's logits [S, V] float32 to one token per row, with no host
sync per request.

Semantics are the host sampler's (services/worker/engine/sampler.py, after its penalties): a row
with temperature 0 takes the exact argmax of its raw logits (the first index on ties, as
torch.argmax); any other row divides its logits by the temperature, keeps its top_k largest
(top_k <= 0: all; ties at the k-th value kept), then the smallest set of most likely tokens whose
probability reaches top_p, then drops tokens less likely than min_p times the most likely, and
draws one token from the softmax of what is left. `sampling_probs_ref` is that spec in torch.

The draw is Gumbel-max (the exponential race of the host sampler in log space): the token is
argmax_i(x_i - log(E_i)) over the kept tokens, x the scaled logits and E_i = -log(U_i) Exp(1)
noise, which picks token i with probability softmax(x)_i without normalising anything. U_i comes
from philox keyed by the row's 64-bit seed at counter (offset * V + i), so a row's token depends
only on its own logits, parameters, seed and offset: not on the batch, its position in it, or the
launch. Offsets are per-request draw counters (the number of tokens the request has sampled), so
a resumed or preempted request draws what the uninterrupted one would have; unseeded requests
take a seed from the engine's generator when they are admitted.

Work split:
- top-k and top-p need each row's order statistics: `sampling_thresholds` sorts the rows with
  torch's batched device sort and cumsum (a Triton sort would not pay for itself) and returns one
  raw-logit threshold per row (token i is kept iff logits[i] >= threshold). Comparing raw logits,
  not scaled ones, keeps the mask independent of the kernel's division rounding. When no row of the
  step uses top-k or top-p the caller passes use_top_k_top_p=False and the sort is skipped.
- `_sample_kernel` (Triton, one program per row, the vocabulary in BLOCK_V chunks): pass 1 takes
  the row's max and first argmax of the raw logits (the greedy token; the max is also the kept
  set's max, since a threshold never exceeds it); pass 2, for sampling rows only, applies the
  temperature, the threshold mask and min-p (exp(x_i - x_max) >= min_p is "p_i >= min_p * p_max"
  without the normaliser) and keeps a running Gumbel argmax. Two reads of the row, no writes but
  the token.
- `_probs_kernel` writes the same masked distribution (a third pass for the normaliser); tests
  check it against the reference, and it is what a caller that needs the probabilities reads.

Masks agree with the reference except at exact ties of float rounding (a raw logit below the
threshold whose scaled value rounds equal to the threshold's), which the reference itself resolves
by sort order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 4096
_MAX_BLOCK_ROWS = 16


# ----------------------------------------------------------------------------------- reference

def sampling_probs_ref(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """[S, V] float32 probabilities after temperature (0 counts as 1 here), top-k, top-p and min-p:
    the host sampler's `processed_probs` with per-row tensors for parameters."""
    vocab_size = logits.shape[-1]
    scaled = logits / torch.where(temperature > 0, temperature, 1.0).to(logits.dtype)[:, None]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # [S, 1]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    sorted_logits, order = scaled.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p.to(cumulative.dtype)[:, None]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    scaled = sorted_logits.scatter(-1, order, sorted_logits)
    probs = scaled.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.to(probs.dtype)[:, None]
    return scaled.masked_fill(probs < threshold, float("-inf")).softmax(dim=-1)


def sample_ref(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[S] int64 tokens: argmax for temperature-0 rows, else one exponential-race draw from
    `sampling_probs_ref` with the generator's noise (the same distribution as `sample`, other draws)."""
    probs = sampling_probs_ref(logits, temperature, top_k, top_p, min_p)
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-30)
    return torch.where(temperature == 0, logits.argmax(dim=-1), (probs / noise).argmax(dim=-1))


# ----------------------------------------------------------------------------------- thresholds

def sampling_thresholds(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[S] float32: the smallest raw logit a row keeps under its top-k and top-p (device ops only).

    The same arithmetic as the reference on the sorted row: dividing by a positive temperature
    keeps the order, so the ascending sorted scaled row is the sorted raw row divided, and its
    softmax-cumsum is the reference's; the tokens top-p drops are a prefix of that order."""
    vocab_size = logits.shape[-1]
    sorted_raw = logits.sort(dim=-1).values  # [S, V] ascending
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth = sorted_raw.gather(-1, (vocab_size - k)[:, None])  # [S, 1]: the k-th largest raw logit
    scaled = sorted_raw / torch.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = scaled.masked_fill(sorted_raw < kth, float("-inf"))
    cumulative = scaled.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p[:, None]
    drop[:, -1] = False  # the most likely token always stays
    num_dropped = drop.sum(dim=-1, keepdim=True)  # [S, 1]
    return torch.maximum(kth, sorted_raw.gather(-1, num_dropped))[:, 0]


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _load_rows(logits_ptr, rows, stride_row, index, num_rows, vocab_size):
    """[BLOCK_ROWS, BLOCK_V] raw logits of a chunk, -inf outside the rows and the vocabulary."""
    inside = (rows < num_rows)[:, None] & (index < vocab_size)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_row + index[None, :]
    return tl.load(logits_ptr + offsets, mask=inside, other=float("-inf"))


@triton.jit
def _first_argmax(best, best_index, vocab_size):
    """Row max of per-lane maxima and the first index holding it."""
    top = tl.max(best, axis=1)
    return top, tl.min(tl.where(best == top[:, None], best_index, vocab_size), axis=1)


@triton.jit
def _rows_max_argmax(logits_ptr, rows, stride_row, num_rows, vocab_size,
                     BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: each row's max and the first index holding it."""
    cols = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_ROWS, BLOCK_V], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK_ROWS, BLOCK_V], 0, tl.int32)
    for start in range(0, vocab_size, BLOCK_V):
        index = start + cols
        x = _load_rows(logits_ptr, rows, stride_row, index, num_rows, vocab_size)
        better = x > best  # strict: each lane keeps its earliest maximum
        best = tl.where(better, x, best)
        best_index = tl.where(better, index[None, :], best_index)
    return _first_argmax(best, best_index, vocab_size)


@triton.jit
def _kept_scaled(logits_ptr, rows, stride_row, index, num_rows, vocab_size, temperature, threshold, scaled_max,
                 min_p):
    """Scaled logits of a chunk, -inf where the top-k/top-p threshold or min-p drops the token.
    temperature, threshold, scaled_max, min_p: [BLOCK_ROWS, 1]."""
    raw = _load_rows(logits_ptr, rows, stride_row, index, num_rows, vocab_size)
    x = raw / temperature
    keep = (raw > float("-inf")) & (raw >= threshold) & (tl.exp(x - scaled_max) >= min_p)
    return tl.where(keep, x, float("-inf"))


@triton.jit
def _row_params(temperature_ptr, threshold_ptr, min_p_ptr, rows, num_rows):
    """Per-row parameters as [BLOCK_ROWS, 1] columns; temperature 0 (greedy) reads as 1."""
    inside = rows < num_rows
    temperature = tl.load(temperature_ptr + rows, mask=inside, other=0.0)
    threshold = tl.load(threshold_ptr + rows, mask=inside, other=float("-inf"))
    min_p = tl.load(min_p_ptr + rows, mask=inside, other=0.0)
    safe_temperature = tl.where(temperature > 0, temperature, 1.0)
    return temperature, safe_temperature[:, None], threshold[:, None], min_p[:, None]


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, num_rows, vocab_size,
    temperature_ptr, threshold_ptr, min_p_ptr, seed_ptr, offset_ptr,  # [S] each
    out_ptr,  # [S] int64
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    inside = rows < num_rows
    row_max, token = _rows_max_argmax(logits_ptr, rows, stride_row, num_rows, vocab_size, BLOCK_ROWS, BLOCK_V)
    row_max = tl.where(inside, row_max, 0.0)  # rows past the end: finite, so no inf - inf below
    temperature, safe_temperature, threshold, min_p = _row_params(temperature_ptr, threshold_ptr, min_p_ptr,
                                                                  rows, num_rows)
    if tl.max(temperature, axis=0) > 0:  # pass 2 only where some row samples
        seed = tl.load(seed_ptr + rows, mask=inside, other=0)
        counter_base = tl.load(offset_ptr + rows, mask=inside, other=0) * vocab_size  # draw `offset`'s counters
        scaled_max = row_max[:, None] / safe_temperature
        cols = tl.arange(0, BLOCK_V)
        # philox's key per element: the row's seed, broadcast so key and counter share a shape
        seed_2d = tl.broadcast_to(seed[:, None], [BLOCK_ROWS, BLOCK_V])
        best = tl.full([BLOCK_ROWS, BLOCK_V], float("-inf"), tl.float32)
        best_index = tl.full([BLOCK_ROWS, BLOCK_V], 0, tl.int32)
        for start in range(0, vocab_size, BLOCK_V):
            index = start + cols
            x = _kept_scaled(logits_ptr, rows, stride_row, index, num_rows, vocab_size, safe_temperature, threshold,
                             scaled_max, min_p)
            uniform = tl.rand(seed_2d, counter_base[:, None] + index[None, :])  # [0, 1); 0 is never drawn
            score = x - tl.log(-tl.log(uniform))
            better = score > best
            best = tl.where(better, score, best)
            best_index = tl.where(better, index[None, :], best_index)
        _, drawn = _first_argmax(best, best_index, vocab_size)
        token = tl.where(temperature > 0, drawn, token)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=inside)


@triton.jit
def _probs_kernel(
    logits_ptr, stride_row, num_rows, vocab_size, temperature_ptr, threshold_ptr, min_p_ptr,
    probs_ptr, stride_probs_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_max, _ = _rows_max_argmax(logits_ptr, rows, stride_row, num_rows, vocab_size, BLOCK_ROWS, BLOCK_V)
    row_max = tl.where(rows < num_rows, row_max, 0.0)  # rows past the end: finite, so no inf - inf below
    _, temperature, threshold, min_p = _row_params(temperature_ptr, threshold_ptr, min_p_ptr, rows, num_rows)
    scaled_max = row_max[:, None] / temperature
    cols = tl.arange(0, BLOCK_V)
    total = tl.zeros([BLOCK_ROWS, BLOCK_V], tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        x = _kept_scaled(logits_ptr, rows, stride_row, start + cols, num_rows, vocab_size, temperature, threshold,
                         scaled_max, min_p)
        total += tl.exp(x - scaled_max)
    normaliser = tl.sum(total, axis=1)[:, None]
    for start in range(0, vocab_size, BLOCK_V):
        index = start + cols
        x = _kept_scaled(logits_ptr, rows, stride_row, index, num_rows, vocab_size, temperature, threshold,
                         scaled_max, min_p)
        offsets = rows.to(tl.int64)[:, None] * stride_probs_row + index[None, :]
        inside = (rows < num_rows)[:, None] & (index < vocab_size)[None, :]
        tl.store(probs_ptr + offsets, tl.exp(x - scaled_max) / normaliser, mask=inside)


# ----------------------------------------------------------------------------------- launchers

def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    seeds: torch.Tensor, offsets: torch.Tensor, *, use_top_k_top_p: bool = True,
) -> torch.Tensor:
    """[S] int64 tokens from logits [S, V] float32 and per-row temperature, top_k, top_p, min_p
    (float or int [S]), seeds and offsets (int64 [S]). use_top_k_top_p=False (no row uses them,
    known to the caller from the host-side parameters) skips the sort."""
    logits, params = _checked(logits, temperature, top_k, top_p, min_p, seeds, offsets)
    temperature, top_k, top_p, min_p, seeds, offsets = params
    thresholds = _thresholds(logits, temperature, top_k, top_p, use_top_k_top_p)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        block_rows, block_v = _blocks(logits.shape[1])
        _sample_kernel[(triton.cdiv(logits.shape[0], block_rows),)](
            logits, logits.stride(0), logits.shape[0], logits.shape[1], temperature, thresholds, min_p, seeds,
            offsets, tokens, BLOCK_ROWS=block_rows, BLOCK_V=block_v,
        )
    return tokens


def sampling_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    *, use_top_k_top_p: bool = True,
) -> torch.Tensor:
    """[S, V] float32: the distribution `sample` draws from (`sampling_probs_ref` on the device)."""
    seeds = torch.zeros(logits.shape[0] if logits.ndim == 2 else 0, dtype=torch.int64, device=logits.device)
    logits, params = _checked(logits, temperature, top_k, top_p, min_p, seeds, seeds)
    temperature, top_k, top_p, min_p, _, _ = params
    thresholds = _thresholds(logits, temperature, top_k, top_p, use_top_k_top_p)
    probs = torch.empty_like(logits)
    if logits.shape[0]:
        block_rows, block_v = _blocks(logits.shape[1])
        _probs_kernel[(triton.cdiv(logits.shape[0], block_rows),)](
            logits, logits.stride(0), logits.shape[0], logits.shape[1], temperature, thresholds, min_p, probs,
            probs.stride(0), BLOCK_ROWS=block_rows, BLOCK_V=block_v,
        )
    return probs


def _thresholds(logits, temperature, top_k, top_p, use_top_k_top_p: bool) -> torch.Tensor:
    if use_top_k_top_p:
        return sampling_thresholds(logits, temperature, top_k, top_p).contiguous()
    return torch.full((logits.shape[0],), float("-inf"), dtype=torch.float32, device=logits.device)


def _blocks(vocab_size: int) -> tuple[int, int]:
    """(rows per program, vocabulary chunk): a program works on about _MAX_BLOCK_V logits at a time,
    so a large vocabulary gets a program per row (S programs, each looping over V) and a small one
    packs rows (fewer, fuller programs)."""
    block_v = min(triton.next_power_of_2(vocab_size), _MAX_BLOCK_V)
    return max(1, min(_MAX_BLOCK_ROWS, _MAX_BLOCK_V // block_v)), block_v


def _checked(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """Shape, dtype and device checks (host metadata only: nothing here waits for the device)."""
    if logits.ndim != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [S, V] float32, got {tuple(logits.shape)} {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column (the vocabulary is empty)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel reads rows as contiguous runs
    num_rows = logits.shape[0]
    named = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
             "seeds": seeds, "offsets": offsets}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (num_rows,):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a tensor of shape ({num_rows},) (one per logits row), got {shape}")
        if tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device}, logits on {logits.device}: they must share a device")
    for name in ("top_k", "seeds", "offsets"):
        if named[name].dtype.is_floating_point or named[name].dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {named[name].dtype}")
    for name in ("temperature", "top_p", "min_p"):
        if not named[name].dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {named[name].dtype}")
    params = (
        temperature.to(torch.float32).contiguous(), top_k.to(torch.int64).contiguous(),
        top_p.to(torch.float32).contiguous(), min_p.to(torch.float32).contiguous(),
        seeds.to(torch.int64).contiguous(), offsets.to(torch.int64).contiguous(),
    )
    return logits, params
