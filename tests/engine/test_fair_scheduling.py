"""Fairness between tenants (virtual token counters) and priority preemption in the scheduler.

The simulations drive schedule()/update() with a fixed sampled token and no model, counting steps as
time: "steps to first token" is the steps from a request's arrival to the step that samples its
first token, itself included (1 = admitted and prefilled the step it arrived)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.worker.engine.config import SchedulerConfig
from services.worker.engine.scheduler import Scheduler, TenantStats
from services.worker.engine.sequence import Sequence, SequenceStatus
from tests.engine.builders import FakeClock, make_scheduler, make_seq, run_step

# Overload: 8 seats, each request holds one for 9-48 steps; the noisy tenant sends one a step, the
# quiet one a tenth as many. num_blocks=96 lets seats bind; 48 makes blocks bind too.
_OVERLOAD = dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64)


def _workload(num_steps: int, *, noisy: bool = True, quiet_tenant: str = "quiet", noisy_tenant: str = "noisy",
              seed: int = 0) -> tuple[list[tuple[int, Sequence]], list[Sequence]]:
    """(arrival step, sequence) pairs, and the quiet tenant's sequences."""
    rng = random.Random(seed)
    arrivals, quiet = [], []
    for step in range(num_steps):
        if noisy:
            arrivals.append((step, make_seq(rng.randint(8, 24), tenant=noisy_tenant, max_tokens=rng.randint(8, 24))))
        if step % 10 == 5:
            seq = make_seq(rng.randint(8, 24), tenant=quiet_tenant, max_tokens=rng.randint(8, 24))
            arrivals.append((step, seq))
            quiet.append(seq)
    return arrivals, quiet


def _steps_to_first_token(scheduler: Scheduler, arrivals: list[tuple[int, Sequence]], num_steps: int) -> dict:
    by_step: dict[int, list[Sequence]] = {}
    for step, seq in arrivals:
        by_step.setdefault(step, []).append(seq)
    arrived_at, first_token = {}, {}
    for step in range(num_steps):
        for seq in by_step.get(step, []):
            scheduler.add(seq)
            arrived_at[seq] = step
        out = run_step(scheduler)
        for seq in out.sampled_seqs:
            first_token.setdefault(seq, step - arrived_at[seq] + 1)
    return first_token


def _mean_steps_to_first_token(num_blocks: int, **workload) -> float:
    arrivals, quiet = _workload(400, **workload)
    first_token = _steps_to_first_token(make_scheduler(num_blocks, **_OVERLOAD), arrivals, 400)
    return sum(first_token.get(seq, 400) for seq in quiet) / len(quiet)


def _fill(scheduler: Scheduler, tenant: str, num_seqs: int, num_tokens: int = 4, **kwargs) -> list[Sequence]:
    seqs = [make_seq(num_tokens, tenant=tenant, **kwargs) for _ in range(num_seqs)]
    for seq in seqs:
        scheduler.add(seq)
    return seqs


@pytest.mark.parametrize("num_blocks", [96, 48], ids=["seats-bind", "blocks-bind"])
def test_quiet_tenant_first_token_under_a_10x_noisy_tenant_stays_within_1_5x_of_alone(num_blocks):
    alone = _mean_steps_to_first_token(num_blocks, noisy=False)
    shared = _mean_steps_to_first_token(num_blocks)
    assert shared <= 1.5 * alone


def test_without_tenants_the_quiet_requests_wait_behind_the_noisy_backlog():
    # The same load as one tenant: first come, first served, and the quiet requests queue for ages.
    alone = _mean_steps_to_first_token(96, noisy=False)
    as_one_tenant = _mean_steps_to_first_token(96, quiet_tenant="", noisy_tenant="")
    assert as_one_tenant > 20 * alone


def test_quiet_requests_get_a_first_token_within_two_steps_under_a_10x_noisy_tenant():
    arrivals, quiet = _workload(400)
    scheduler = make_scheduler(96, **_OVERLOAD)
    first_token = _steps_to_first_token(scheduler, arrivals, 400)
    assert len(scheduler.waiting) > 100  # overloaded throughout
    assert max(first_token[seq] for seq in quiet) <= 2


@pytest.mark.parametrize("num_blocks", [96, 40], ids=["seats-bind", "blocks-bind"])
def test_backlogged_tenants_each_get_about_half_the_computed_tokens(num_blocks):
    scheduler = make_scheduler(num_blocks, **_OVERLOAD)
    for i in range(400):
        _fill(scheduler, "noisy", 1, 16, max_tokens=16)
        if i % 10 == 0:
            _fill(scheduler, "quiet", 1, 16, max_tokens=16)
    computed = Counter()
    while all(stats.num_waiting for stats in scheduler.tenant_stats().values()):
        out = run_step(scheduler)
        for seq, num_tokens in zip(out.scheduled_seqs, out.num_scheduled_tokens):
            computed[seq.tenant] += num_tokens
    assert computed["quiet"] > 1000
    assert 0.45 <= computed["quiet"] / computed.total() <= 0.55


def test_admissions_in_one_step_alternate_between_tenants():
    scheduler = make_scheduler(64, max_num_seqs=4)
    _fill(scheduler, "a", 4)
    _fill(scheduler, "b", 4)
    out = run_step(scheduler)
    assert [seq.tenant for seq in out.scheduled_seqs] == ["a", "b", "a", "b"]


def test_fair_preemption_sends_back_the_newest_sequence_of_the_tenant_over_its_share():
    scheduler = make_scheduler(64, max_num_seqs=4)
    noisy = _fill(scheduler, "noisy", 6)
    run_step(scheduler)
    assert scheduler.running == noisy[:4]
    (quiet,) = _fill(scheduler, "quiet", 1)
    out = run_step(scheduler)
    assert out.preempted_seqs == [noisy[3]]
    assert out.scheduled_seqs == [*noisy[:3], quiet]
    assert noisy[3].status is SequenceStatus.WAITING and noisy[3].block_table == []
    assert scheduler.num_fair_preemptions == scheduler.num_preemptions == 1


def test_fairness_never_preempts_within_one_tenant():
    scheduler = make_scheduler(64, max_num_seqs=4)
    _fill(scheduler, "a", 8)
    for _ in range(5):
        run_step(scheduler)
    assert scheduler.num_preemptions == 0 and len(scheduler.waiting) == 4


def test_fairness_never_preempts_a_tenant_within_its_share():
    scheduler = make_scheduler(64, max_num_seqs=4)
    _fill(scheduler, "a", 2)
    _fill(scheduler, "b", 2)
    run_step(scheduler)
    _fill(scheduler, "a", 3)
    _fill(scheduler, "b", 3)
    for _ in range(5):
        run_step(scheduler)
    assert scheduler.num_preemptions == 0
    assert Counter(seq.tenant for seq in scheduler.running) == {"a": 2, "b": 2}


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_fair_preemptions_are_bounded_per_step(limit):
    scheduler = make_scheduler(64, max_num_seqs=8, max_fair_preemptions_per_step=limit)
    _fill(scheduler, "noisy", 10)
    run_step(scheduler)
    _fill(scheduler, "quiet", 4)  # its share: 4 of the 8 seats
    per_step = [len(run_step(scheduler).preempted_seqs) for _ in range(6)]
    assert all(n <= limit for n in per_step) and sum(per_step) == (4 if limit else 0)
    assert scheduler.num_fair_preemptions == sum(per_step)


def test_a_backlogged_tenant_gets_the_seats_that_free_up_rather_than_preempting():
    scheduler = make_scheduler(64, max_num_seqs=4)
    noisy = _fill(scheduler, "noisy", 4, max_tokens=3)
    _fill(scheduler, "noisy", 4)
    run_step(scheduler)
    quiet = _fill(scheduler, "quiet", 3)  # more than its share of 2 seats
    run_step(scheduler)
    assert scheduler.num_preemptions == 0
    run_step(scheduler)  # noisy's first four finish
    assert all(seq.is_finished for seq in noisy)
    run_step(scheduler)  # quiet, behind in service, takes the free seats first
    assert all(seq.status is SequenceStatus.RUNNING for seq in quiet)
    assert scheduler.num_preemptions == 0


def test_fairness_never_preempts_a_better_priority():
    scheduler = make_scheduler(64, max_num_seqs=4)
    _fill(scheduler, "noisy", 4, priority=0)
    run_step(scheduler)
    (quiet,) = _fill(scheduler, "quiet", 1, priority=1)
    for _ in range(3):
        run_step(scheduler)
    assert scheduler.num_preemptions == 0 and quiet.status is SequenceStatus.WAITING


def test_priority_beats_tenant_order():
    scheduler = make_scheduler(64, max_num_seqs=1)
    (first,) = _fill(scheduler, "a", 1, max_tokens=3)
    run_step(scheduler)
    (behind,) = _fill(scheduler, "b", 1, priority=1)
    (urgent,) = _fill(scheduler, "a", 1, priority=0)
    run_step(scheduler)
    run_step(scheduler)  # first finishes
    assert first.is_finished
    assert scheduler.tenant_counters["b"] < scheduler.tenant_counters["a"]
    out = run_step(scheduler)
    assert out.scheduled_seqs == [urgent] and behind.status is SequenceStatus.WAITING


def test_block_shortage_preempts_the_tenant_holding_the_most_seats_before_the_newest():
    # 6 blocks of 4: three 8-token prompts fill the pool; every next decode needs a block.
    scheduler = make_scheduler(6, 4)
    b1, b2 = _fill(scheduler, "b", 2, 8)
    (a1,) = _fill(scheduler, "a", 1, 8)
    run_step(scheduler)
    out = run_step(scheduler)
    assert out.preempted_seqs == [b2]
    assert out.scheduled_seqs == [b1, a1]


def test_deadline_and_abort_of_fair_preempted_sequences_free_their_blocks():
    clock = FakeClock()
    scheduler = make_scheduler(64, max_num_seqs=4, prefix_caching=True, clock=clock)
    noisy = _fill(scheduler, "noisy", 4, 8, deadline_s=10.0)
    run_step(scheduler)
    _fill(scheduler, "quiet", 1, 8)
    out = run_step(scheduler)
    (victim,) = out.preempted_seqs
    scheduler.abort(noisy[0].request_id)
    clock.now = 10.0
    out = scheduler.schedule()
    assert set(out.finished_seqs) == set(noisy)
    assert victim.finish_reason.value == "deadline" and victim not in scheduler.waiting
    assert noisy[0].finish_reason.value == "abort"
    assert scheduler.kv_cache.num_used_blocks == 3  # the quiet sequence's 9 tokens
    assert set(scheduler.tenant_stats()) == {"quiet"}


def test_tokens_are_charged_with_their_weights():
    scheduler = make_scheduler(64, fair_prompt_token_weight=3.0, fair_output_token_weight=5.0)
    _fill(scheduler, "a", 1, 6)
    run_step(scheduler)  # 6 prompt tokens and the first sampled one
    assert scheduler.tenant_counters["a"] == 6 * 3.0 + 5.0
    run_step(scheduler)
    assert scheduler.tenant_counters["a"] == 6 * 3.0 + 2 * 5.0


def test_recompute_after_preemption_is_not_charged():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    (old,) = _fill(scheduler, "a", 1, 8, max_tokens=2)
    (new,) = _fill(scheduler, "a", 1, 8)
    for _ in range(3):  # old finishes as new is preempted; new computes its 9 tokens again
        run_step(scheduler)
    assert new.num_preemptions == 1 and new.num_computed_tokens == 9 and new.num_output_tokens == 2
    assert old.is_finished and not new.is_finished
    service = sum(seq.num_prompt_tokens + 2 * seq.num_output_tokens for seq in (old, new))
    assert scheduler.tenant_counters["a"] == service


def test_prefix_cache_hits_are_not_charged():
    scheduler = make_scheduler(prefix_caching=True)
    first = make_seq(tokens=list(range(10, 22)), tenant="a")
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq(tokens=list(range(10, 22)) + [5], tenant="a")
    scheduler.add(second)
    run_step(scheduler)
    assert second.num_cached_tokens == 12
    assert scheduler.tenant_counters["a"] == (12 + 2 * 2) + (1 + 2)


@pytest.mark.parametrize("seed", range(8))
def test_scheduling_invariants_hold_for_random_tenants_and_priorities(seed):
    rng = random.Random(seed)
    limit = rng.choice([1, 2])
    scheduler = make_scheduler(rng.choice([24, 48]), **{**_OVERLOAD, "max_num_seqs": rng.choice([2, 4, 8])},
                               prefix_caching=True, max_fair_preemptions_per_step=limit)
    for step in range(300):
        for _ in range(rng.choice([0, 0, 1, 2])):
            scheduler.add(make_seq(rng.randint(2, 30), tenant=rng.choice("abc"), priority=rng.choice([0, 0, 1]),
                                   max_tokens=rng.randint(1, 20)))
        fair_before, running_before = scheduler.num_fair_preemptions, list(scheduler.running)
        out = run_step(scheduler)
        assert all(any(seq is r for r in running_before) for seq in out.preempted_seqs)  # none admitted, then sent back
        assert not set(out.preempted_seqs) & set(out.scheduled_seqs)  # no victim readmitted the step it left
        assert scheduler.num_fair_preemptions - fair_before <= limit
        assert len(scheduler.running) <= scheduler.config.max_num_seqs
        assert len(scheduler.waiting) + len(scheduler.running) == len(scheduler.requests)
    for request_id in list(scheduler.requests):
        scheduler.abort(request_id)
    scheduler.schedule()
    assert scheduler.kv_cache.num_used_blocks == 0 and not scheduler.has_unfinished()
    assert scheduler.tenant_stats() == {}


def test_tenant_idle_for_long_gets_no_burst_of_banked_credit():
    scheduler = make_scheduler(64, **{**_OVERLOAD, "max_num_seqs": 4})
    _fill(scheduler, "b", 1, 8, max_tokens=2)
    _fill(scheduler, "a", 200, 8, max_tokens=8)
    for _ in range(100):  # b finished long ago; a has had the engine since
        run_step(scheduler)
    assert "b" not in scheduler.tenant_counters
    _fill(scheduler, "b", 50, 8, max_tokens=8)
    assert scheduler.tenant_counters["b"] == scheduler.tenant_counters["a"]
    computed = Counter()
    for _ in range(40):
        out = run_step(scheduler)
        for seq, num_tokens in zip(out.scheduled_seqs, out.num_scheduled_tokens):
            computed[seq.tenant] += num_tokens
    assert computed["b"] / computed.total() <= 0.6


def test_tenant_arriving_to_an_idle_engine_starts_at_the_last_tenants_counter():
    scheduler = make_scheduler(64)
    _fill(scheduler, "a", 1, 4, max_tokens=2)
    run_step(scheduler)
    counter = scheduler.tenant_counters["a"]
    run_step(scheduler)
    assert not scheduler.has_unfinished() and scheduler.tenant_counters == {}
    _fill(scheduler, "b", 1)
    assert scheduler.tenant_counters["b"] == counter + 2.0


def test_idle_tenants_debt_is_kept_until_the_ttl():
    clock = FakeClock()
    scheduler = make_scheduler(64, clock=clock, fair_idle_counter_ttl_s=60.0)
    _fill(scheduler, "a", 1, 4)  # one long request, nothing queued: b may take the other seats
    _fill(scheduler, "b", 7, 4, max_tokens=10)
    for _ in range(10):
        run_step(scheduler)
    debt = scheduler.tenant_counters["b"]
    assert debt > scheduler.tenant_counters["a"] and not scheduler.tenant_stats().get("b")
    clock.now = 30.0
    run_step(scheduler)
    _fill(scheduler, "b", 1)
    assert scheduler.tenant_counters["b"] == debt  # returned within the ttl: still behind a
    scheduler.abort(scheduler.waiting.by_tenant()["b"][0].request_id)
    run_step(scheduler)
    clock.now = 100.0
    run_step(scheduler)
    assert "b" not in scheduler.tenant_counters
    _fill(scheduler, "b", 1)
    assert scheduler.tenant_counters["b"] == scheduler.tenant_counters["a"]


def test_counters_stay_bounded_as_tenants_come_and_go():
    clock = FakeClock()
    scheduler = make_scheduler(64, clock=clock, fair_idle_counter_ttl_s=10.0)
    _fill(scheduler, "steady", 1, 4, max_tokens=1000, ignore_eos=True)
    for step in range(200):
        _fill(scheduler, f"once-{step}", 1, 4, max_tokens=2)
        run_step(scheduler)
        clock.now += 1.0
    assert len(scheduler.tenant_counters) <= 13  # steady, two active, ten at most in debt


def test_tenant_stats_report_queue_seats_and_service():
    scheduler = make_scheduler(64, max_num_seqs=2, max_num_batched_tokens=8)
    _fill(scheduler, "a", 1, 6)
    _fill(scheduler, "b", 2, 6)
    run_step(scheduler)  # a's prompt, then 2 of b's first
    stats = scheduler.tenant_stats()
    assert stats["a"] == TenantStats(num_waiting=0, num_queued_tokens=0, num_running=1, service=6.0 + 2.0)
    assert stats["b"] == TenantStats(num_waiting=1, num_queued_tokens=6, num_running=1, service=2.0)


def test_waiting_holds_every_waiting_sequence_across_tenants():
    scheduler = make_scheduler(64, max_num_seqs=1)
    running = make_seq(4, tenant="a")
    scheduler.add(running)
    run_step(scheduler)
    later, urgent, other = make_seq(4, tenant="a"), make_seq(4, tenant="b", priority=-1), make_seq(5, tenant="b")
    for seq in (later, urgent, other):
        scheduler.add(seq)
    assert len(scheduler.waiting) == 3 and scheduler.waiting == [urgent, later, other]
    assert later in scheduler.waiting and running not in scheduler.waiting
    assert sum(seq.num_uncomputed_tokens for seq in scheduler.waiting) == 13


def test_fairness_weights_and_limits_must_not_be_negative():
    with pytest.raises(ValueError, match="fair_output_token_weight"):
        SchedulerConfig(fair_output_token_weight=-1.0)
    with pytest.raises(ValueError, match="max_fair_preemptions_per_step"):
        SchedulerConfig(max_fair_preemptions_per_step=-1)
