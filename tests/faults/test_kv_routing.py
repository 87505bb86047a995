"""KV-aware routing sends a prompt where its prefix is cached: with more shared system prompts than
one replica's cache holds, kv_aware hits the prefix cache more often than least_load (same requests,
another router); and a single hot prefix does not pile every request onto the replica holding it."""

from __future__ import annotations

import asyncio
import random
import signal

import pytest

from tests.faults.conftest import SMALL_LLM, start_router
from tests.faults.generation_client import Client, request

pytestmark = pytest.mark.slow

NUM_PREFIXES = 16
NUM_REQUESTS = 200
WORDS = ("river stone lantern harbor quiet copper meadow signal winter orchard velvet compass thunder "
         "pepper canyon marble feather glacier saddle violet ember tunnel wander crystal basket").split()


def system_prompts(seed: int) -> list[str]:
    """NUM_PREFIXES distinct system prompts of about 160 tokens (ten 16-token blocks)."""
    rng = random.Random(seed)
    return [f"System {seed}-{i}: you are assistant {i}. " + " ".join(rng.choice(WORDS) for _ in range(130))
            for i in range(NUM_PREFIXES)]


def prefix_traffic(prompts: list[str], seed: int) -> list:
    rng = random.Random(seed)
    return [request(SMALL_LLM, f"{rng.choice(prompts)}\nQuestion {n}: what comes next?", 2)
            for n in range(NUM_REQUESTS)]


def run(router: str, messages) -> list:
    async def go():
        async with Client(router) as client:
            return await client.many(messages, concurrency=4, timeout_s=60)

    return asyncio.run(go())


def hit_rate(workers, before) -> float:
    after = [w.stats() for w in workers]
    hits = sum(a.num_prefix_hit_tokens - b.num_prefix_hit_tokens for a, b in zip(after, before))
    queries = sum(a.num_prefix_query_tokens - b.num_prefix_query_tokens for a, b in zip(after, before))
    return hits / queries


@pytest.fixture(scope="module")
def least_load_router(small_fleet):
    process, address = start_router(small_fleet, "--routing-policy", "least_load", log_name="router-least-load.log")
    yield address
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def test_kv_aware_routing_hits_the_prefix_cache_more_than_least_load(small_fleet, least_load_router):
    workers = small_fleet.wait_for_workers(2)
    rates = {}
    for name, router, seed in (("least_load", least_load_router, 1), ("kv_aware", small_fleet.router, 2)):
        before = [w.stats() for w in workers]
        outcomes = run(router, prefix_traffic(system_prompts(seed), seed))
        assert [o.code for o in outcomes] == ["OK"] * NUM_REQUESTS, {o.details for o in outcomes if not o.ok}
        rates[name] = hit_rate(workers, before)
    print(f"\nprefix cache hit rate (of prompt tokens), {NUM_REQUESTS} requests over {NUM_PREFIXES} system prompts: "
          f"least_load {rates['least_load']:.1%}, kv_aware {rates['kv_aware']:.1%}")
    assert rates["kv_aware"] > rates["least_load"]


def test_one_hot_prefix_is_shared_out_not_piled_onto_one_replica(small_fleet):
    workers = small_fleet.wait_for_workers(2)
    hot = system_prompts(3)[0]
    before = [w.stats().num_requests_ok for w in workers]
    outcomes = run(small_fleet.router, [request(SMALL_LLM, f"{hot}\nQuestion {n}: and then?", 8) for n in range(100)])
    assert [o.code for o in outcomes] == ["OK"] * 100
    served = [w.stats().num_requests_ok - b for w, b in zip(workers, before)]
    print(f"\none hot prefix, 100 requests: {served[0]} and {served[1]} per worker")
    assert max(served) <= 65
