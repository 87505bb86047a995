"""The rollback decision: a canary's windowed counts against the stable version's."""

from __future__ import annotations

from protos.tensoryard.v1 import registry_pb2
from services.rollout.decision import DEFAULT_ROLLBACK, VersionCounts, judge


def counts(requests: int, errors: int = 0, mean_ms: float = 10.0) -> VersionCounts:
    successes = requests - errors
    return VersionCounts(requests, errors, successes, successes * mean_ms * 1000)


def test_waits_until_the_canary_has_min_requests():
    verdict = judge(counts(19, errors=19), counts(1000), DEFAULT_ROLLBACK)
    assert not verdict.roll_back
    assert "19 of the 20" in verdict.reason


def test_rolls_back_when_the_error_rate_rises_by_more_than_the_bound():
    verdict = judge(counts(100, errors=10), counts(900, errors=9), DEFAULT_ROLLBACK)
    assert verdict.roll_back
    assert "10.0%" in verdict.reason and "1.0%" in verdict.reason


def test_keeps_a_canary_whose_error_rate_rises_by_less_than_the_bound():
    assert not judge(counts(100, errors=5), counts(900, errors=9), DEFAULT_ROLLBACK).roll_back


def test_compares_with_the_stable_error_rate_not_with_zero():
    # Both versions fail 20%: the canary is no worse than what serves already.
    assert not judge(counts(100, errors=20), counts(900, errors=180), DEFAULT_ROLLBACK).roll_back


def test_an_idle_stable_version_counts_as_error_free():
    assert judge(counts(50, errors=10), VersionCounts(), DEFAULT_ROLLBACK).roll_back


def test_rolls_back_when_the_mean_latency_is_over_the_ratio():
    verdict = judge(counts(100, mean_ms=25.0), counts(900, mean_ms=10.0), DEFAULT_ROLLBACK)
    assert verdict.roll_back
    assert "2.50x" in verdict.reason


def test_keeps_a_canary_slower_by_less_than_the_ratio():
    assert not judge(counts(100, mean_ms=19.0), counts(900, mean_ms=10.0), DEFAULT_ROLLBACK).roll_back


def test_no_latency_verdict_without_stable_successes():
    assert not judge(counts(100, mean_ms=500.0), VersionCounts(), DEFAULT_ROLLBACK).roll_back


def test_zero_latency_ratio_turns_the_latency_bound_off():
    bounds = registry_pb2.RollbackPolicy(window_s=30, min_requests=20, max_error_rate_increase=0.05)
    assert not judge(counts(100, mean_ms=500.0), counts(900, mean_ms=10.0), bounds).roll_back


def test_refusals_and_cancellations_are_requests_but_not_errors():
    # What window.version_counts makes of 60 OK, 40 RESOURCE_EXHAUSTED: 100 requests, 0 errors.
    canary = VersionCounts(num_requests=100, num_errors=0, num_successes=60, success_duration_us=600_000)
    assert not judge(canary, counts(900), DEFAULT_ROLLBACK).roll_back


def test_min_requests_zero_still_needs_one_request():
    bounds = registry_pb2.RollbackPolicy(window_s=30, max_error_rate_increase=0.05)
    assert not judge(VersionCounts(), VersionCounts(), bounds).roll_back
