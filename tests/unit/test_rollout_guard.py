"""The rollback guard's rounds: scrape, window, judge, roll back once (with fake routers and store)."""

from __future__ import annotations

import asyncio

from protos.tensoryard.v1 import registry_pb2
from services.rollout.decision import DEFAULT_ROLLBACK
from services.rollout.guard import RollbackGuard
from services.status.scrape import router_metrics_urls
from services.status.scrape import Scrape, parse
from tests.unit.test_rollout_window import MODEL, page


def canary_policy() -> registry_pb2.TrafficPolicy:
    return registry_pb2.TrafficPolicy(
        model_name=MODEL, stable_version=1, revision=4, rollback=DEFAULT_ROLLBACK,
        splits=[registry_pb2.TrafficSplit(version=1, percent=90), registry_pb2.TrafficSplit(version=2, percent=10)])


class Fleet:
    """One router whose page the test sets, a store holding one policy, a clock."""

    def __init__(self, policy):
        self.policies = [policy] if policy else []
        self.text = page({"1": 0})
        self.rolled_back: list[tuple[registry_pb2.TrafficPolicy, str, dict]] = []
        self.num_scrapes = 0
        self.now_s = 0.0
        self.guard = RollbackGuard(lambda: self.policies, self.roll_back, lambda: ["http://r1/metrics"],
                                   fetch=self.fetch, clock=lambda: self.now_s)

    def fetch(self, urls, timeout_s):
        self.num_scrapes += 1
        return {url: Scrape(url, parse(self.text)) for url in urls}

    def roll_back(self, policy, reason, details) -> bool:
        self.rolled_back.append((policy, reason, details))
        self.policies = []
        return True

    def round(self, ok: dict[str, int], failed=None):
        self.now_s += 1.0
        self.text = page(ok, failed)
        return asyncio.run(self.guard.check())


def test_rolls_back_a_failing_canary_with_the_figures():
    fleet = Fleet(canary_policy())
    fleet.round({"1": 0})
    fleet.round({"1": 180, "2": 10}, {"2": {"INTERNAL": 10}})
    (policy, reason, details), = fleet.rolled_back
    assert policy.revision == 4
    assert "canary error rate 50.0%" in reason
    assert details["canary"]["errors"] == 10 and details["stable"]["requests"] == 180


def test_keeps_a_healthy_canary():
    fleet = Fleet(canary_policy())
    fleet.round({"1": 0})
    for step in range(1, 5):
        fleet.round({"1": 90 * step, "2": 10 * step})
    assert fleet.rolled_back == []


def test_scrapes_nothing_without_a_canary():
    fleet = Fleet(None)
    fleet.round({"1": 10})
    assert fleet.num_scrapes == 0


def test_a_policy_without_rollback_bounds_is_not_watched():
    policy = canary_policy()
    policy.ClearField("rollback")
    fleet = Fleet(policy)
    fleet.round({"1": 0})
    fleet.round({"1": 10, "2": 50}, {"2": {"INTERNAL": 50}})
    assert fleet.rolled_back == [] and fleet.num_scrapes == 0


def test_router_urls_come_from_discovery_metadata():
    class Instance:
        def __init__(self, address, metadata):
            self.address, self.metadata = address, metadata

    urls = router_metrics_urls([Instance("127.0.0.1:8001", {"metrics_port": "8002"}),
                                Instance("127.0.0.1:8003", {"metrics_port": "-1"}), Instance("h:1", {})])
    assert urls == ["http://127.0.0.1:8002/metrics"]
