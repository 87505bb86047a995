"""The embedded discovery catalog: leases, the change index, blocking watches and KV CAS."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.registry.discovery import DiscoveryCatalog, InstanceRecord


class FakeClock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def instance(instance_id="w1", model="m", ttl_ms=1000) -> InstanceRecord:
    return InstanceRecord(instance_id, "worker", "127.0.0.1:1", model, "1", {}, "", ttl_ms, 0.0)


def catalog_with_clock() -> tuple[DiscoveryCatalog, FakeClock]:
    clock = FakeClock()
    return DiscoveryCatalog(_clock=clock), clock


def test_instance_expires_without_heartbeats():
    catalog, clock = catalog_with_clock()
    catalog.register(instance(ttl_ms=1000))
    clock.now_s += 0.9
    assert catalog.expire() == []
    clock.now_s += 0.2
    assert catalog.expire() == ["w1"]
    assert catalog.list() == []


def test_heartbeat_renews_the_lease():
    catalog, clock = catalog_with_clock()
    lease = catalog.register(instance(ttl_ms=1000))
    for _ in range(5):
        clock.now_s += 0.8
        catalog.heartbeat(lease)
        assert catalog.expire() == []


def test_heartbeat_on_an_expired_lease_is_not_found():
    catalog, clock = catalog_with_clock()
    lease = catalog.register(instance(ttl_ms=1000))
    clock.now_s += 2
    catalog.expire()
    with pytest.raises(NotFound, match="register again"):
        catalog.heartbeat(lease)


def test_registering_again_replaces_the_old_lease():
    catalog, _ = catalog_with_clock()
    old = catalog.register(instance())
    catalog.register(instance())
    assert len(catalog.list()) == 1
    with pytest.raises(NotFound):
        catalog.heartbeat(old)


def test_list_filters_by_model():
    catalog, _ = catalog_with_clock()
    catalog.register(instance("a", model="m1"))
    catalog.register(instance("b", model="m2"))
    assert [i.instance_id for i in catalog.list(model_name="m2")] == ["b"]


def test_every_change_raises_the_index():
    catalog, _ = catalog_with_clock()
    start = catalog.index
    catalog.register(instance())
    catalog.deregister("w1")
    catalog.kv_put("k", b"v")
    assert catalog.index == start + 3


def test_too_short_ttl_is_refused():
    catalog, _ = catalog_with_clock()
    with pytest.raises(InvalidArgument, match="ttl_ms"):
        catalog.register(instance(ttl_ms=10))


def test_watch_wakes_on_change_and_times_out_without_one():
    async def scenario():
        catalog = DiscoveryCatalog()
        seen = catalog.index
        assert await catalog.wait_for_change(seen, timeout_s=0.05) is False
        waiter = asyncio.create_task(catalog.wait_for_change(seen, timeout_s=5))
        await asyncio.sleep(0.01)
        catalog.register(instance())
        assert await asyncio.wait_for(waiter, 1) is True

    asyncio.run(scenario())


def test_kv_cas_succeeds_only_on_the_current_index():
    catalog, _ = catalog_with_clock()
    ok, index = catalog.kv_put("tensoryard/deployments/m/replicas", b"1", cas_index=0)
    assert ok
    ok, _ = catalog.kv_put("tensoryard/deployments/m/replicas", b"2", cas_index=0)
    assert not ok  # cas 0 means "only if absent"
    ok, _ = catalog.kv_put("tensoryard/deployments/m/replicas", b"3", cas_index=index)
    assert ok
    assert catalog.kv_get("tensoryard/deployments/m/replicas")[0].value == b"3"
    ok, _ = catalog.kv_put("tensoryard/deployments/m/replicas", b"4", cas_index=index)
    assert not ok  # stale index


def test_kv_prefix_get_is_sorted():
    catalog, _ = catalog_with_clock()
    for key in ("a/2", "a/1", "b/1"):
        catalog.kv_put(key, b"x")
    assert [r.key for r in catalog.kv_get("a/", prefix=True)] == ["a/1", "a/2"]
