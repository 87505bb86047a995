"""The router's hold for deployments scaled to zero (services/router/cold_start.py): which requests
wait, for which version, how long and how many, and what the autoscaler is told while they wait."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest

from services.common.errors import Overloaded, Unavailable
from services.common.scaling_keys import held_key, sum_fresh_held
from services.router.catalog import CatalogModel
from services.router.cold_start import ColdStartHold, HeldSignals
from services.router.policies import RouteRequest
from services.router.traffic import TrafficPolicy


def in_event_loop(test):
    @functools.wraps(test)
    def run():
        return asyncio.run(test())

    return run


class Pool:
    def __init__(self):
        self.ready: set[tuple[str, str]] = set()

    def routable(self, model_name: str = "", model_version: str = "") -> list:
        return [object()] if (model_name, model_version) in self.ready else []


class Catalog:
    def __init__(self, at_zero: set[tuple[str, int]]):
        self.at_zero = at_zero

    def scales_to_zero(self, model_name: str, version: int) -> bool:
        return (model_name, version) in self.at_zero

    def scale_to_zero_versions(self, model_name: str) -> set[int]:
        return {v for m, v in self.at_zero if m == model_name}


class KV:
    """The discovery KV as HeldSignals uses it."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.writes: list[str] = []

    async def kv_put(self, key: str, value: bytes) -> None:
        self.values[key] = value
        self.writes.append(key)

    async def kv_delete(self, key: str) -> None:
        self.values.pop(key, None)


def route(version: str = "2") -> RouteRequest:
    return RouteRequest("m", version)


@in_event_loop
async def test_a_held_request_goes_on_once_a_replica_of_its_version_is_routable_and_the_kv_saw_it_held():
    pool, kv = Pool(), KV()
    signals = HeldSignals(kv, "router-a", min_interval_s=0.01)
    publishing = asyncio.create_task(signals.run())
    hold = ColdStartHold(pool, Catalog({("m", 2)}), signals, hold_s=10)
    assert hold.holds(route())
    waiting = asyncio.create_task(hold.wait(route()))
    await asyncio.sleep(0.3)
    assert not waiting.done() and hold.num_held("m") == 1
    assert sum_fresh_held([kv.values[held_key("m", 2, "router-a")]]) == 1
    pool.ready.add(("m", "1"))  # another version's replica does not release it
    await asyncio.sleep(0.2)
    assert not waiting.done()
    pool.ready.add(("m", "2"))
    await asyncio.wait_for(waiting, 2)
    await asyncio.sleep(0.2)
    assert hold.num_held("m") == 0
    assert held_key("m", 2, "router-a") not in kv.values  # deleted at zero
    publishing.cancel()


@in_event_loop
async def test_only_deployments_that_scale_to_zero_hold_and_a_hold_of_zero_seconds_holds_nothing():
    hold = ColdStartHold(Pool(), Catalog({("m", 2)}), None, hold_s=10)
    assert not hold.holds(route("1"))
    assert not hold.holds(RouteRequest("other", "2"))
    assert not ColdStartHold(Pool(), Catalog({("m", 2)}), None, hold_s=0).holds(route())


@in_event_loop
async def test_past_its_bound_a_held_request_is_unavailable_and_says_why():
    hold = ColdStartHold(Pool(), Catalog({("m", 2)}), None, hold_s=0.3)
    with pytest.raises(Unavailable, match="became ready within 0.3 s"):
        await hold.wait(route())
    assert hold.num_held("m") == 0


@in_event_loop
async def test_beyond_max_held_a_request_is_refused_at_once_with_a_retry_hint():
    hold = ColdStartHold(Pool(), Catalog({("m", 2)}), None, hold_s=5, max_held=2)
    waiting = [asyncio.create_task(hold.wait(route())) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded) as refused:
        await hold.wait(route())
    assert refused.value.retry_after_s == 1.0
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert hold.num_held("m") == 0  # a cancelled wait (the caller's deadline) is uncounted


@in_event_loop
async def test_a_request_naming_no_version_waits_for_the_policy_choice_among_versions_at_zero():
    catalog = Catalog({("m", 2), ("m", 3)})
    hold = ColdStartHold(Pool(), catalog, None)
    latest = CatalogModel("m", "embedding", (1, 2, 3))
    assert hold.version_to_wait_for(latest, {}) == 3
    production = CatalogModel("m", "embedding", (1, 2, 3), aliases={"production": 2})
    assert hold.version_to_wait_for(production, {}) == 2
    stable_only = CatalogModel("m", "embedding", (1, 2, 3), policy=TrafficPolicy(stable_version=2))
    assert hold.version_to_wait_for(stable_only, {}) == 2
    not_at_zero = CatalogModel("m", "embedding", (1, 2, 3), aliases={"production": 1})
    assert hold.version_to_wait_for(not_at_zero, {}) is None


def test_held_counts_older_than_the_freshness_window_are_a_router_gone_and_not_counted():
    fresh = json.dumps({"num_held": 3, "at_unix_s": 100.0}).encode()
    stale = json.dumps({"num_held": 5, "at_unix_s": 80.0}).encode()
    assert sum_fresh_held([fresh, stale, b"not json"], now_unix_s=101.0) == 3
