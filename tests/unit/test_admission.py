"""Admission control weighs a request against the engine's queue and refuses, with a pushback, what
could not be served well; a quiet tenant is weighed against its fair share, not the whole queue."""

from __future__ import annotations

import pytest

from services.common.errors import DeadlineExceeded, Overloaded
from services.worker.admission import AdmissionConfig, AdmissionController, WorkItem
from services.worker.engine.engine import EngineStats, TenantQueue
from services.worker.engine.step_cost import StepCost

# 20 ms a step plus 2 ms per sequence; 0.5 ms per prompt token.
COST = StepCost(base_s=0.02, per_seq_s=0.002, per_prefill_token_s=0.0005)


def stats(running=(), tenants=None, max_num_seqs=4, queued_prompt_tokens=None, output_fraction=1.0,
          max_num_batched_tokens=2048) -> EngineStats:
    tenants = tenants or {}
    return EngineStats(
        num_running=len(running), num_waiting=sum(q.num_waiting for q in tenants.values()),
        num_used_blocks=0, num_free_blocks=100, num_total_blocks=100, num_preemptions=0, num_chunked_prefills=0,
        num_prefix_query_tokens=0, num_prefix_hit_tokens=0, max_num_seqs=max_num_seqs, block_size=16,
        max_num_batched_tokens=max_num_batched_tokens,
        num_queued_prompt_tokens=(sum(q.num_prompt_tokens for q in tenants.values())
                                  if queued_prompt_tokens is None else queued_prompt_tokens),
        running_remaining_tokens=tuple(sorted(running)), tenant_queues=tenants,
        expected_output_fraction=output_fraction, step_cost=COST,
    )


def controller(snapshot: EngineStats, **config) -> AdmissionController:
    admission = AdmissionController(AdmissionConfig(**config))
    admission.update(snapshot, num_requests_received=0)
    return admission


def item(tenant="", prompt=20, max_tokens=10, ignore_eos=True) -> WorkItem:
    return WorkItem(tenant, prompt, max_tokens, ignore_eos)


def test_an_idle_replica_admits_and_estimates_one_prefill_step():
    estimate = controller(stats()).admit(item(), deadline_remaining_s=None)
    assert estimate.queue_wait_s == 0
    assert estimate.first_token_s == pytest.approx(COST.step_s(1) + 20 * COST.per_prefill_token_s)
    assert estimate.finish_s == pytest.approx(estimate.first_token_s + 9 * COST.step_s(1))


def test_a_full_seat_set_waits_for_the_running_sequence_closest_to_done():
    snapshot = stats(running=(3, 50, 60, 70))  # every seat taken; one finishes in 3 steps
    estimate = controller(snapshot).admit(item(), None)
    assert estimate.queue_wait_s == pytest.approx(3 * COST.step_s(4))


def test_a_full_queue_is_refused_with_a_pushback():
    snapshot = stats(running=(100,) * 4, tenants={"": TenantQueue(num_waiting=8, num_prompt_tokens=160,
                                                                     num_output_tokens=80)})
    with pytest.raises(Overloaded, match="waiting already") as refused:
        controller(snapshot, max_num_waiting=8, max_queue_wait_s=100).admit(item(), None)
    assert refused.value.retry_after_s > 0


def test_a_wait_past_the_bound_is_refused_and_the_pushback_is_the_excess():
    # Every seat busy for 100 more steps (~2.8 s): far past a 1 s bound.
    snapshot = stats(running=(100,) * 4)
    with pytest.raises(Overloaded, match="estimated wait") as refused:
        controller(snapshot, max_queue_wait_s=1.0).admit(item(), None)
    assert refused.value.retry_after_s == pytest.approx(100 * COST.step_s(4) - 1.0)


def test_a_deadline_the_queue_would_make_it_miss_is_refused():
    snapshot = stats(running=(20, 30, 40, 50))  # a seat in 20 steps (0.56 s)
    admission = controller(snapshot, max_queue_wait_s=10)
    # Alone it would take ~0.24 s; behind this queue ~0.8 s.
    with pytest.raises(Overloaded, match="deadline"):
        admission.admit(item(max_tokens=10), deadline_remaining_s=0.5)
    assert admission.admit(item(max_tokens=10), deadline_remaining_s=2.0) is not None


def test_a_request_too_long_for_its_deadline_even_alone_is_taken_when_its_first_token_can_come():
    # 1,000 tokens cannot fit in 2 s even alone, but it may stop early: the engine ends it at the
    # deadline. What is refused is a request whose first token would already be late.
    admission = controller(stats(), max_queue_wait_s=10)
    assert admission.admit(item(max_tokens=1000, ignore_eos=False), deadline_remaining_s=2.0) is not None
    busy = controller(stats(running=(200,) * 4), max_queue_wait_s=100)
    with pytest.raises(Overloaded, match="first token"):
        busy.admit(item(max_tokens=1000, ignore_eos=False), deadline_remaining_s=2.0)


def test_a_burst_between_two_engine_reports_is_counted():
    admission = controller(stats(max_num_seqs=2), max_queue_wait_s=0.3)
    admitted = 0
    with pytest.raises(Overloaded):
        for submission in range(1, 100):
            admission.admit(item(max_tokens=20), None)
            admission.admitted(item(max_tokens=20), submission)
            admitted += 1
    assert 2 <= admitted < 10
    # Once a report includes them, they are counted from the report, not twice.
    admission.update(stats(max_num_seqs=2), num_requests_received=admitted)
    assert admission.admit(item(max_tokens=20), None) is not None


def test_a_quiet_tenant_is_weighed_against_its_fair_share_not_the_whole_queue():
    noisy_queue = TenantQueue(num_waiting=40, num_prompt_tokens=800, num_output_tokens=400, num_running=4)
    snapshot = stats(running=(5, 6, 7, 8), tenants={"noisy": noisy_queue})
    admission = controller(snapshot, max_queue_wait_s=1.0)
    quiet = admission.admit(item(tenant="quiet"), None)
    assert quiet.queue_wait_s < 0.5
    with pytest.raises(Overloaded):
        admission.admit(item(tenant="noisy"), None)


def test_a_tenant_over_its_share_of_a_crowded_queue_is_refused_while_others_get_in():
    snapshot = stats(running=(1,) * 4, tenants={
        "noisy": TenantQueue(num_waiting=6, num_prompt_tokens=6, num_output_tokens=6),
        "quiet": TenantQueue(num_waiting=1, num_prompt_tokens=1, num_output_tokens=1),
    })
    admission = controller(snapshot, max_num_waiting=10, max_queue_wait_s=100)
    with pytest.raises(Overloaded, match="share"):
        admission.admit(item(tenant="noisy", prompt=1, max_tokens=1), None)
    assert admission.admit(item(tenant="quiet", prompt=1, max_tokens=1), None) is not None


def test_queued_prompt_tokens_are_bounded():
    snapshot = stats(tenants={"": TenantQueue(num_waiting=1, num_prompt_tokens=900, num_output_tokens=1)})
    with pytest.raises(Overloaded, match="prompt tokens"):
        controller(snapshot, max_num_queued_tokens=1000, max_queue_wait_s=100).admit(item(prompt=200), None)


def test_before_the_first_report_nothing_is_refused():
    assert AdmissionController(AdmissionConfig()).admit(item(), deadline_remaining_s=0.001) is None


def test_a_deadline_shorter_than_a_first_token_on_an_idle_replica_is_deadline_exceeded_at_once():
    # No retry could meet it: DEADLINE_EXCEEDED, not RESOURCE_EXHAUSTED.
    with pytest.raises(DeadlineExceeded, match="idle replica"):
        controller(stats()).admit(item(prompt=200), deadline_remaining_s=0.05)


def test_the_auto_wait_bound_is_a_step_and_a_half_at_full_batch_with_a_floor():
    admission = controller(stats(max_num_seqs=4))
    assert admission.queue_wait_bound_s(stats(max_num_seqs=4)) == 0.15  # 1.5 * 28 ms is under the floor
    assert admission.queue_wait_bound_s(stats(max_num_seqs=100)) == pytest.approx(1.5 * COST.step_s(100))


def test_a_resumed_request_skips_the_wait_and_deadline_estimates_but_not_the_queue_bound():
    busy = stats(running=(100,) * 4)
    admission = controller(busy, max_queue_wait_s=0.5)
    assert admission.admit(item(), deadline_remaining_s=0.5, resumed=True) is not None
    full = stats(running=(100,) * 4, tenants={"": TenantQueue(num_waiting=8, num_prompt_tokens=8, num_output_tokens=8)})
    with pytest.raises(Overloaded, match="waiting already"):
        controller(full, max_num_waiting=8).admit(item(), None, resumed=True)


def test_prompts_queued_ahead_share_the_step_up_to_its_token_budget():
    # Three prompts of 100 tokens ahead and free seats: all run in the next step with this one.
    snapshot = stats(tenants={"": TenantQueue(num_waiting=3, num_prompt_tokens=300, num_output_tokens=30)},
                     max_num_batched_tokens=512)
    estimate = controller(snapshot, max_queue_wait_s=10).admit(item(prompt=100), None)
    assert estimate.queue_wait_s == 0
    assert estimate.first_token_s == pytest.approx(COST.step_s(4) + 400 * COST.per_prefill_token_s)
    # Past the budget, whole steps of prefill come before it.
    snapshot = stats(tenants={"": TenantQueue(num_waiting=3, num_prompt_tokens=1200, num_output_tokens=30)},
                     max_num_batched_tokens=512)
    estimate = controller(snapshot, max_queue_wait_s=10).admit(item(prompt=100), None)
    assert estimate.queue_wait_s == pytest.approx(2 * (COST.step_s(4) + 512 * COST.per_prefill_token_s))


def test_a_tenant_below_its_share_of_the_seats_gets_one_from_a_tenant_above_it():
    # The noisy tenant holds every seat; the scheduler preempts one of its sequences for the quiet
    # tenant, so the quiet tenant's request does not wait for a sequence to finish.
    noisy = TenantQueue(num_waiting=20, num_prompt_tokens=400, num_output_tokens=2000, num_running=4)
    snapshot = stats(running=(90, 95, 99, 100), tenants={"noisy": noisy})
    admission = controller(snapshot, max_queue_wait_s=0.5)
    assert admission.admit(item(tenant="quiet"), None).queue_wait_s == 0
    with pytest.raises(Overloaded):
        admission.admit(item(tenant="noisy"), None)
