"""Judging a gate: golden prompts (exact or similar), golden embeddings (cosine), latency p95."""

from __future__ import annotations

import math

from protos.tensoryard.v1 import registry_pb2
from services.rollout.gate import Observation, cosine, judge, p95, text_similarity


def gate(**fields) -> registry_pb2.Gate:
    return registry_pb2.Gate(**fields)


def test_exact_prompt_match_passes_and_any_difference_fails():
    g = gate(golden_prompts=[registry_pb2.GoldenPrompt(prompt="2+2=", expected_text=" 4")])
    assert judge("m", 2, g, [Observation(0.1, text=" 4")], []).passed
    failed = judge("m", 2, g, [Observation(0.1, text=" 4.")], [])
    assert not failed.passed
    assert failed.reasons == ["prompt 1: expected ' 4', got ' 4.'"]


def test_similarity_bound_accepts_close_text_and_rejects_far_text():
    g = gate(golden_prompts=[registry_pb2.GoldenPrompt(prompt="p", expected_text="the cat sat on the mat",
                                                       min_similarity=0.8)])
    assert judge("m", 2, g, [Observation(0.1, text="the cat sat on a mat")], []).passed
    assert not judge("m", 2, g, [Observation(0.1, text="a dog ran")], []).passed


def test_text_similarity_is_difflib_ratio():
    assert text_similarity("abcd", "abcd") == 1.0
    assert text_similarity("abcd", "abce") == 0.75


def test_embedding_within_cosine_bound_passes():
    g = gate(golden_embeddings=[registry_pb2.GoldenEmbedding(text="t", expected=[1.0, 0.0], min_cosine=0.999)])
    assert judge("m", 2, g, [], [Observation(0.1, vector=(2.0, 0.001))]).passed
    failed = judge("m", 2, g, [], [Observation(0.1, vector=(1.0, 0.1))])
    assert not failed.passed and "cosine 0.995" in failed.reasons[0]


def test_embedding_of_another_dimension_fails():
    g = gate(golden_embeddings=[registry_pb2.GoldenEmbedding(text="t", expected=[1.0, 0.0], min_cosine=0.9)])
    result = judge("m", 2, g, [], [Observation(0.1, vector=(1.0, 0.0, 0.0))])
    assert result.reasons == ["embedding 1: dimension 3, expected 2"]


def test_a_failed_request_fails_its_check_with_the_status():
    g = gate(golden_embeddings=[registry_pb2.GoldenEmbedding(text="t", expected=[1.0], min_cosine=0.9)])
    result = judge("m", 2, g, [], [Observation(0.1, error="UNAVAILABLE: no replica")])
    assert result.reasons == ["embedding 1: request failed: UNAVAILABLE: no replica"]


def test_latency_budget_is_on_the_p95():
    goldens = [registry_pb2.GoldenEmbedding(text="t", expected=[1.0], min_cosine=0.9)] * 20
    seen = [Observation(0.01, vector=(1.0,))] * 19 + [Observation(5.0, vector=(1.0,))]
    assert judge("m", 2, gate(golden_embeddings=goldens, latency_budget_s=0.05), [], seen).passed
    slow = [Observation(0.01, vector=(1.0,))] * 18 + [Observation(5.0, vector=(1.0,))] * 2
    result = judge("m", 2, gate(golden_embeddings=goldens, latency_budget_s=0.05), [], slow)
    assert not result.passed and result.reasons[-1].startswith("latency: p95 5000.0 ms over")


def test_an_empty_gate_passes_with_no_checks():
    result = judge("m", 2, gate(), [], [])
    assert result.passed and result.checks == []


def test_p95_is_nearest_rank():
    assert p95(list(range(1, 21))) == 19
    assert p95([3.0]) == 3.0


def test_cosine_of_mismatched_shapes_is_nan():
    assert math.isnan(cosine([1.0], [1.0, 2.0]))
