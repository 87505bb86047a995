from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgument
from services.worker.engine.sampler import (
    Sampler, SamplingParams, apply_min_p, apply_penalties, apply_top_k, apply_top_p,
)
from tests.engine.builders import make_seq

VOCAB = 32
NEG_INF = float("-inf")


def seeded(seed: int, **params):
    seq = make_seq(4, seed=seed, temperature=1.0, **params)
    seq.generator = torch.Generator().manual_seed(seed)
    return seq


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_takes_the_argmax():
    logits = random_logits(3)
    out = Sampler().sample(logits, [make_seq(4) for _ in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_draws_do_not_depend_on_the_batch():
    """The same request, seed and logits row give the same tokens alone or among others."""
    row = random_logits(1, seed=7)
    alone_seq = seeded(1234, top_p=0.9)
    alone = [Sampler(seed=0).sample(row, [alone_seq]).token_ids[0] for _ in range(20)]
    batched_seq = seeded(1234, top_p=0.9)
    sampler = Sampler(seed=99)
    batched = []
    for step in range(20):
        others = [make_seq(4, temperature=0.7), seeded(step), make_seq(4)]
        logits = torch.cat([random_logits(1, seed=100 + step), row, random_logits(2, seed=200 + step)])
        batched.append(sampler.sample(logits, [others[0], batched_seq, *others[1:]]).token_ids[1])
    assert alone == batched
    assert len(set(alone)) > 1  # it did sample, not argmax


def test_unseeded_sampling_follows_the_distribution():
    logits = torch.full((1, VOCAB), NEG_INF)
    logits[0, 3], logits[0, 5] = 0.0, math.log(3.0)  # p(3) = 0.25, p(5) = 0.75
    sampler = Sampler(seed=0)
    draws = [sampler.sample(logits, [make_seq(4, temperature=1.0)]).token_ids[0] for _ in range(400)]
    assert set(draws) == {3, 5}
    assert 0.65 < draws.count(5) / 400 < 0.85


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    masked = apply_top_k(logits, torch.tensor([2, 0]))
    assert torch.isinf(masked[0]).tolist() == [True, False, True, False]
    assert not torch.isinf(masked[1]).any()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    masked = apply_top_p(probs.log(), torch.tensor([0.75]))
    assert torch.isinf(masked[0]).tolist() == [False, False, True, True]
    masked = apply_top_p(probs.log(), torch.tensor([0.1]))
    assert torch.isinf(masked[0]).tolist() == [False, True, True, True]  # at least the top token


def test_min_p_drops_tokens_far_below_the_top():
    probs = torch.tensor([[0.6, 0.3, 0.07, 0.03]])
    masked = apply_min_p(probs.log(), torch.tensor([0.1]))  # threshold 0.06
    assert torch.isinf(masked[0]).tolist() == [False, False, False, True]


def test_repetition_penalty_scales_seen_tokens_toward_zero():
    seq = make_seq(tokens=[0, 1], repetition_penalty=2.0)
    logits = apply_penalties(torch.tensor([[4.0, -4.0, 4.0]]), [seq])
    assert logits.tolist() == [[2.0, -8.0, 4.0]]


def test_frequency_and_presence_penalties_use_output_tokens():
    seq = make_seq(tokens=[0], frequency_penalty=0.5, presence_penalty=1.0)
    seq.token_ids += [1, 1, 2]  # output: token 1 twice, token 2 once; prompt token 0 untouched
    logits = apply_penalties(torch.zeros(1, 4), [seq])
    assert logits.tolist() == [[0.0, -2.0, -1.5, 0.0]]


def test_penalties_change_the_greedy_choice():
    seq = make_seq(tokens=[0], frequency_penalty=2.0)
    seq.token_ids += [1]
    logits = torch.tensor([[0.0, 1.0, 0.5]])
    assert Sampler().sample(logits, [seq]).token_ids == [2]


def test_logprobs_are_the_raw_distribution():
    logits = random_logits(2)
    seqs = [make_seq(4, logprobs=3), make_seq(4)]
    out = Sampler().sample(logits, seqs)
    expected = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(float(expected[0, first.token_id]), abs=1e-6)
    assert [t for t, _ in first.top] == expected[0].topk(3).indices.tolist()
    assert out.logprobs[1] is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
        ("top_k", -2), ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5), ("max_tokens", 0), ("seed", 1.5), ("stop", [""]),
        ("stop_token_ids", [-1]), ("logprobs", 21), ("max_tokens", True),
    ],
)
def test_invalid_params_name_the_parameter(name, value):
    with pytest.raises(InvalidArgument, match=name):
        SamplingParams(**{name: value})


def test_lists_become_tuples():
    params = SamplingParams(stop=["a"], stop_token_ids=[1, 2])
    assert params.stop == ("a",) and params.stop_token_ids == (1, 2)
