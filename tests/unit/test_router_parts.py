"""The router's smaller parts: the KV index (events and routed prompts), the retry budget, the
in-flight limit with tenant shares, and the stream kinds' resumed requests."""

from __future__ import annotations

import pytest

from protos.tensoryard.v1 import generation_pb2
from services.common.errors import Overloaded
from services.router.admission import InFlightLimiter
from services.router.kv_index import KvIndex
from services.router.prompts import prompt_block_hashes
from services.router.relay import NativeGenerate
from services.router.retry import RetryBudget
from services.common.kv_blocks import block_hashes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


A, B, C = (bytes([i]) * 32 for i in range(3))


def test_the_index_counts_leading_blocks_each_replica_holds():
    index = KvIndex()
    index.apply_events("r1", [A, B, C], [], snapshot=True)
    index.apply_events("r2", [A, C], [], snapshot=True)
    assert index.matched_blocks([A, B, C], ["r1", "r2", "r3"]) == {"r1": 3, "r2": 1, "r3": 0}


def test_events_after_a_snapshot_add_and_remove_blocks():
    index = KvIndex()
    index.apply_events("r1", [A, B], [], snapshot=True)
    index.apply_events("r1", [C], [B], snapshot=False)
    assert index.matched_blocks([A, B], ["r1"]) == {"r1": 1}
    index.apply_events("r1", [B], [], snapshot=True)  # a new snapshot replaces what was known
    assert index.matched_blocks([A], ["r1"]) == {"r1": 0}


def test_without_events_routed_prompts_stand_in_until_their_ttl():
    clock = Clock()
    index = KvIndex(routed_ttl_s=10, clock=clock)
    index.record_routed("r1", [A, B])
    assert not index.has_events("r1")
    assert index.matched_blocks([A, B], ["r1"]) == {"r1": 2}
    clock.now = 11
    assert index.matched_blocks([A, B], ["r1"]) == {"r1": 0}


def test_with_events_a_routed_prompt_counts_only_briefly():
    clock = Clock()
    index = KvIndex(events_overlay_ttl_s=2, clock=clock)
    index.apply_events("r1", [], [], snapshot=True)
    index.record_routed("r1", [A])  # its prefill has not run yet: not in the events
    assert index.matched_blocks([A], ["r1"]) == {"r1": 1}
    clock.now = 3
    assert index.matched_blocks([A], ["r1"]) == {"r1": 0}


def test_routed_entries_are_bounded_per_replica():
    index = KvIndex(max_routed_per_replica=2)
    index.record_routed("r1", [A, B, C])
    assert index.matched_blocks([B, C], ["r1"]) == {"r1": 2}
    assert index.matched_blocks([A], ["r1"]) == {"r1": 0}


def test_a_prompt_of_whole_blocks_offers_all_but_its_last_block():
    token_ids = list(range(48))  # exactly 3 blocks of 16: the last token is always computed
    assert prompt_block_hashes(token_ids, 16) == block_hashes(token_ids, 16)[:2]
    assert prompt_block_hashes(token_ids + [7], 16) == block_hashes(token_ids, 16)


def test_the_retry_budget_allows_a_share_of_requests_plus_a_floor():
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, max_tokens=1, clock=clock)
    assert budget.try_spend()  # the bucket starts full
    assert not budget.try_spend()
    for _ in range(5):
        budget.on_request()
    assert budget.try_spend() and not budget.try_spend()
    floor = RetryBudget(ratio=0.0, min_per_s=10.0, max_tokens=1, clock=clock)
    assert floor.try_spend() and not floor.try_spend()
    clock.now += 0.1
    assert floor.try_spend()


def test_the_in_flight_bound_refuses_with_a_pushback():
    limiter = InFlightLimiter(max_in_flight=2)
    limiter.acquire("m", "")
    limiter.acquire("m", "")
    with pytest.raises(Overloaded) as refused:
        limiter.acquire("m", "")
    assert refused.value.retry_after_s > 0
    limiter.release("m", "")
    limiter.acquire("m", "")
    limiter.acquire("other-model", "")  # a bound per model


def test_a_lone_tenant_may_use_the_whole_bound():
    limiter = InFlightLimiter(max_in_flight=10)
    for _ in range(10):
        limiter.acquire("m", "only")


def test_past_half_the_bound_a_tenant_over_its_share_is_refused_and_others_are_not():
    limiter = InFlightLimiter(max_in_flight=10)
    limiter.acquire("m", "quiet")
    for _ in range(5):  # its share with two tenants in flight
        limiter.acquire("m", "noisy")
    with pytest.raises(Overloaded, match="share"):
        limiter.acquire("m", "noisy")
    limiter.acquire("m", "quiet")
    assert limiter.holds_share("m", "noisy") and not limiter.holds_share("m", "quiet")


def test_a_resumed_native_request_is_the_original_plus_the_tokens_sent():
    original = generation_pb2.GenerateRequest(model_name="m", prompt="Hello", resume_token_ids=[1])
    resumed = NativeGenerate().resumed(original.SerializeToString(), [5, 6])
    parsed = generation_pb2.GenerateRequest.FromString(resumed)
    assert parsed.prompt == "Hello" and list(parsed.resume_token_ids) == [1, 5, 6]
