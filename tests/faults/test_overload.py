"""Overload is refused at once, not queued to die: at 10x capacity, refusals come within 50 ms, few
requests run out of time, none fail any other way, and those accepted get their first token about as
fast as at capacity; memory stays bounded. A tenant sending ten times another's rate cannot starve
it. A deadline ends a generation and the engine stops computing it."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import SMALL_LLM
from tests.faults.generation_client import Client, percentile, request

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
TENANT_HEADER = "x-tenant-id"


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def message(n: int):
    return request(SMALL_LLM, f"Request {n}: count from one to twenty:", MAX_TOKENS)


def first_tokens(outcomes) -> list[float]:
    return [o.first_token_s for o in outcomes if o.ok and o.first_token_s is not None]


def test_ten_times_capacity_is_refused_fast_and_what_is_accepted_is_served_as_at_capacity(small_fleet):
    workers = small_fleet.wait_for_workers(2)
    pids = {"router": small_fleet.router_pid(), **{f"worker {w.instance_id}": w.pid for w in workers}}

    async def at_capacity():
        async with Client(small_fleet.router) as client:
            # As many callers as seats (4 per worker): every request finds a seat as the last ends.
            return await client.closed_loop(lambda i, n: message(1000 * i + n), num_clients=8, duration_s=10)

    capacity = asyncio.run(at_capacity())
    assert all(o.ok for o in capacity), sorted({o.details for o in capacity if not o.ok})[:3]
    capacity_rate = len(capacity) / 10
    capacity_p99 = percentile(first_tokens(capacity), 99)
    memory_before = {name: rss_mb(pid) for name, pid in pids.items()}

    async def overloaded():
        async with Client(small_fleet.router) as client:
            return await client.open_loop(message, rate_per_s=10 * capacity_rate, duration_s=8, timeout_s=30)

    outcomes = asyncio.run(overloaded())
    memory_after = {name: rss_mb(pid) for name, pid in pids.items()}
    codes = [o.code for o in outcomes]
    rejected = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    accepted = [o for o in outcomes if o.ok]
    summary = {code: codes.count(code) for code in set(codes)}
    accepted_first, capacity_first = first_tokens(accepted), first_tokens(capacity)
    print(f"\nat capacity: {capacity_rate:.1f} req/s, TTFT p50 {percentile(capacity_first, 50) * 1000:.0f} ms "
          f"p99 {capacity_p99 * 1000:.0f} ms; 10x ({len(outcomes)} requests): {summary}; refusals p99 "
          f"{percentile([o.ended_s for o in rejected], 99) * 1000:.1f} ms; accepted TTFT p50 "
          f"{percentile(accepted_first, 50) * 1000:.0f} ms p95 {percentile(accepted_first, 95) * 1000:.0f} ms "
          f"p99 {percentile(accepted_first, 99) * 1000:.0f} ms")
    print("RSS MB before -> after: " + ", ".join(
        f"{name} {memory_before[name]:.0f} -> {memory_after[name]:.0f}" for name in pids))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, summary
    assert codes.count("DEADLINE_EXCEEDED") < 0.05 * len(outcomes)
    assert len(accepted) >= 0.5 * capacity_rate * 8  # the fleet kept working near capacity
    assert percentile([o.ended_s for o in rejected], 99) < 0.05
    assert all(o.pushback_ms and o.pushback_ms > 0 for o in rejected), "refusals carry a retry pushback"
    # "As fast as at capacity", in the middle and in the tail. In the middle: capacity's p50 plus at
    # most the queue wait a worker admits (the bound it reports). The tail is p95, not p99: of the
    # ~50-90 requests accepted, p99 is the single slowest, set by one burst of the Poisson arrivals
    # on a machine whose two cores the client, the router and both workers share.
    admitted_wait_s = max(w.stats().queue_wait_bound_s for w in workers)
    assert 0 < admitted_wait_s < 1
    assert percentile(accepted_first, 50) <= percentile(capacity_first, 50) + admitted_wait_s
    assert percentile(accepted_first, 95) <= 2 * capacity_p99
    for name in pids:
        assert memory_after[name] - memory_before[name] < 200, f"{name} grew under overload"


def test_a_tenant_at_ten_times_anothers_rate_cannot_starve_it(small_fleet):
    """The quiet tenant (well within its share) is served while the noisy one overloads the fleet;
    were both one tenant, the quiet requests would be refused like the noisy ones."""
    workers = small_fleet.wait_for_workers(2)
    # Calibrated where two 4-seat workers serve ~8 requests a second (a ~60 ms full-batch step): the
    # quiet tenant sends 1 a second for 20 s, the noisy one 10. A faster machine serves more, and
    # 10 a second would no longer overload it: both rates scale with the measured capacity, and the
    # duration shrinks by as much, so each tenant sends as many requests as at calibration.
    step = workers[0].stats()
    capacity_per_s = 8 / ((MAX_TOKENS + 1) * (step.step_base_s + 4 * step.step_per_seq_s))
    speed = max(1.0, capacity_per_s / 8)
    quiet_rate, duration_s = speed, 20 / speed

    def quiet(n):
        return request(SMALL_LLM, f"Quiet question {n}: name a colour.", MAX_TOKENS)

    def noisy(n):
        return request(SMALL_LLM, f"Noisy question {n}: name a number.", MAX_TOKENS)

    async def run(quiet_tenant: str, with_noisy: bool):
        async with Client(small_fleet.router) as client:
            calm = client.open_loop(quiet, quiet_rate, duration_s, metadata=((TENANT_HEADER, quiet_tenant),))
            if not with_noisy:
                return [], await calm
            loud = client.open_loop(noisy, 10 * quiet_rate, duration_s, metadata=((TENANT_HEADER, "noisy"),), seed=1)
            return await asyncio.gather(loud, calm)

    _, solo = asyncio.run(run("quiet", with_noisy=False))
    loud, calm = asyncio.run(run("quiet", with_noisy=True))
    _, merged = asyncio.run(run("noisy", with_noisy=True))  # the same traffic, as one tenant
    stats = workers[0].stats()
    full_step_s = stats.step_base_s + 4 * stats.step_per_seq_s
    solo_p99, calm_p99 = percentile(first_tokens(solo), 99), percentile(first_tokens(calm), 99)
    for name, outcomes in (("alone", solo), ("beside a 10x tenant", calm)):
        values = first_tokens(outcomes)
        print(f"\nquiet tenant {name}: {sum(o.ok for o in outcomes)}/{len(outcomes)} served, TTFT "
              + " ".join(f"p{q} {percentile(values, q) * 1000:.0f} ms" for q in (10, 50, 90, 99)))
    print(f"quiet TTFT p99 beside / alone: {calm_p99 / solo_p99:.2f}x (a full-batch step: {full_step_s * 1000:.0f} ms); "
          f"noisy served {sum(o.ok for o in loud)}/{len(loud)}; the quiet requests as the noisy tenant's own: "
          f"{sum(o.ok for o in merged)}/{len(merged)} served")
    assert all(o.ok for o in solo)
    assert sum(o.ok for o in loud) < 0.75 * len(loud), "the noisy tenant should have overloaded the fleet"
    # Within its share of the engine the quiet tenant is served (a burst past its share of one
    # replica's seats may be refused like anyone's) ...
    assert sum(o.ok for o in calm) >= 0.85 * len(calm), [o.details for o in calm if not o.ok][:2]
    # ... which it owes to fairness: as part of the noisy tenant, it is refused like the noisy requests.
    assert sum(o.ok for o in merged) / len(merged) <= 0.85 * sum(o.ok for o in calm) / len(calm)
    # Its first tokens come about as fast as alone: 1.5x, plus the one step in progress that a
    # newcomer to a saturated engine always waits out (alone, it mostly finds the engine idle). Of
    # 20 requests the p99 is the slowest one, at the mercy of one scheduling hiccup of a shared
    # machine: the 1.5x holds at p90, the tail within 2x.
    solo_p90, calm_p90 = percentile(first_tokens(solo), 90), percentile(first_tokens(calm), 90)
    assert calm_p90 <= 1.5 * solo_p90 + full_step_s
    assert calm_p99 <= 2 * solo_p99 + full_step_s


def test_a_deadline_ends_a_long_generation_and_the_engine_stops_computing_it(small_fleet):
    workers = small_fleet.wait_for_workers(2)

    async def run():
        async with Client(small_fleet.router) as client:
            return await client.many([request(SMALL_LLM, "Tell me a very long story.", 1000)], timeout_s=2.0)

    (outcome,) = asyncio.run(run())
    assert outcome.code == "DEADLINE_EXCEEDED"
    assert 0 < len(outcome.token_ids) < 1000
    time.sleep(0.5)  # the step under way when the deadline passed may still finish
    at_deadline = sum(w.stats().num_generated_tokens for w in workers)
    time.sleep(1.0)
    assert sum(w.stats().num_generated_tokens for w in workers) == at_deadline
