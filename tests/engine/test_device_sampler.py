"""The device sampler (the triton backend's) keeps the host sampler's semantics where they are
deterministic — greedy tokens, penalties, logprobs — and draws each seeded row from its own seed and
counter, whatever the batch. Without CUDA the kernel runs under triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from kernels.sampling import sample
from services.worker.engine.device_sampler import DeviceSampler, as_int64
from services.worker.engine.sampler import Sampler, SamplingParams
from services.worker.engine.step_inputs import SamplingRow

VOCAB = 37
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def logits_rows(rows: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


def row(params: SamplingParams, seed: int = 0, num_drawn: int = 0, tokens=(3, 5, 5, 9)) -> SamplingRow:
    return SamplingRow(params, None, list(tokens), list(tokens[2:]), seed=seed, num_drawn=num_drawn)


def test_greedy_rows_penalties_and_logprobs_are_the_host_samplers():
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=0.0, repetition_penalty=1.7, logprobs=3)),
        row(SamplingParams(temperature=0.0, frequency_penalty=1.2, presence_penalty=0.4, logprobs=0)),
        row(SamplingParams(temperature=0.0, top_k=3, top_p=0.5)),  # filters do not touch greedy rows
    ]
    logits = logits_rows(len(rows))
    on_device = DeviceSampler(sample).sample(logits, rows)
    on_host = Sampler(device=DEVICE).sample(logits, rows)
    assert on_device.token_ids == on_host.token_ids
    for got, expected in zip(on_device.logprobs, on_host.logprobs):
        assert (got is None) == (expected is None)
        if got is not None:
            assert got.token_id == expected.token_id and got.logprob == pytest.approx(expected.logprob)
            assert [t for t, _ in got.top] == [t for t, _ in expected.top]


def test_a_seeded_row_draws_the_same_token_in_any_batch_and_position():
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    target_logits = logits_rows(1, seed=7)
    sampler = DeviceSampler(sample)
    alone = [sampler.sample(target_logits, [row(params, seed=42, num_drawn=n)]).token_ids[0] for n in range(12)]
    others = [row(SamplingParams(temperature=0.8)), row(SamplingParams(temperature=0.0)),
              row(SamplingParams(temperature=1.2, top_k=5, seed=1), seed=1)]
    for n in range(12):
        batch = logits_rows(len(others), seed=100 + n)
        logits = torch.cat([batch[:n % 3], target_logits, batch[n % 3:]])
        rows = [*others[:n % 3], row(params, seed=42, num_drawn=n), *others[n % 3:]]
        assert sampler.sample(logits, rows).token_ids[n % 3] == alone[n], f"draw {n}"
    assert len(set(alone)) > 1, "the counter moves the draw on"


def test_draws_follow_the_seed_not_the_sampler():
    params = SamplingParams(temperature=1.0)
    logits = logits_rows(1).expand(64, VOCAB).contiguous()
    rows = [row(params, seed=s) for s in range(64)]
    first = DeviceSampler(sample, seed=1).sample(logits, rows).token_ids
    assert DeviceSampler(sample, seed=2).sample(logits, rows).token_ids == first
    assert len(set(first)) > 3  # 64 seeds on one distribution do not all draw alike


def test_requests_without_a_seed_get_their_own_and_seeds_wrap_to_64_bits():
    sampler = DeviceSampler(sample, seed=0)
    unseeded = {sampler.seed_request(SamplingParams(), 0, VOCAB)[1] for _ in range(100)}
    assert len(unseeded) == 100 and all(0 <= s < 2**63 for s in unseeded)
    assert sampler.seed_request(SamplingParams(seed=5), 3, VOCAB) == (None, 5)
    assert as_int64(2**64 + 5) == 5 and as_int64(2**63) == -(2**63) and as_int64(-1) == -1
