"""The sampler of a backend that draws on the device (the `triton` backend's `Ops.sample`).

The host `Sampler` (sampler.py) is the semantics: penalties, then greedy argmax at temperature 0,
else temperature, top-k, top-p, min-p and one draw. Here the penalties are the same torch code (on
the device, rows without penalties untouched) and the rest is one kernel launch for the whole step
(kernels/sampling.py): the step's parameters go to the device as two small tensors, and the tokens
come back with one read, so there is one host sync a step, not one per request.

Draws: a row's token is a function of its logits, its parameters, its seed and its counter (the
number of tokens the request has sampled), not of the batch. A request with a seed is keyed by it;
one without gets a seed from the engine's own stream when it is admitted. A request resumed from
another replica continues at its counter, so with the same seed it draws what the uninterrupted
generation would have, with no generator to advance. The draws differ from the host sampler's
(philox against torch.Generator's stream): a seeded request gives the same tokens on every replica
of one backend, not across backends.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from services.worker.engine.sampler import (
    SamplerOutput,
    SamplingParams,
    SamplingRequest,
    apply_penalties,
    token_logprobs,
)

_INT64_SPAN = 1 << 64


class DeviceSampler:
    def __init__(self, sample: Callable[..., torch.Tensor], seed: int = 0):
        self._sample = sample
        self._seeds = random.Random(seed)  # for requests without a seed of their own

    def seed_request(self, params: SamplingParams, num_sampled: int, vocab_size: int) -> tuple[None, int]:
        """(generator, draw seed) for a new request; the counter of a resumed one is its
        num_sampled tokens, which its rows carry, so nothing is advanced here."""
        if params.seed is None:
            return None, self._seeds.getrandbits(63)
        return None, as_int64(params.seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor | None, seqs: list[SamplingRequest]) -> SamplerOutput:
        """logits [S, vocab_size] float32, one row per sequence in seqs (`step_inputs.SamplingRow`s)."""
        if logits is None or not seqs:
            return SamplerOutput([], [])
        params = [seq.params for seq in seqs]
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            penalized = apply_penalties(logits.clone(), seqs)
        else:
            penalized = logits
        floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params],
                               [p.min_p for p in params]], dtype=torch.float32)
        ints = torch.tensor([[p.top_k for p in params], [seq.seed for seq in seqs],
                             [seq.num_drawn for seq in seqs]], dtype=torch.int64)
        floats, ints = _to_device(floats, logits.device), _to_device(ints, logits.device)
        use_top_k_top_p = any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy)
        token_ids = self._sample(penalized, floats[0], ints[0], floats[1], floats[2], ints[1], ints[2],
                                 use_top_k_top_p=use_top_k_top_p)
        return SamplerOutput(token_ids.tolist(), token_logprobs(logits, token_ids, params))


def as_int64(seed: int) -> int:
    """Any Python int as the signed 64-bit key the kernel reads (the same bits for seed and seed + 2**64)."""
    seed %= _INT64_SPAN
    return seed - _INT64_SPAN if seed >= _INT64_SPAN // 2 else seed


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)  # ordered before the kernel on the stream
