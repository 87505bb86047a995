"""The rollback guard: runs in the registry, watches every canary, rolls back the ones that break.

Every second, when some model's policy gives a canary a share (otherwise it scrapes nothing), it
reads the /metrics page of every router discovery lists (service `router`, metadata
`metrics_port`), adds what each brought to a sliding window per (model, version) (window.py), and
asks decision.judge whether each canary, against its policy's stable version over the policy's
window, must go. A breach sets the policy back to 100% stable (only if nobody changed it since:
the revision is checked) and writes `rollback` with the figures to the audit log. A policy whose
rollback bounds are unset (window_s 0) is not watched.

The store calls (policies, roll_back) are the registry's, in-process; they run in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from protos.tensoryard.v1 import registry_pb2
from services.common.telemetry import get_logger
from services.rollout.decision import Verdict, judge
from services.rollout.promote import canary_versions
from services.rollout.window import CountsWindow, version_counts
from services.status.scrape import fetch_all, router_metrics_urls

log = get_logger(__name__)

CHECK_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 0.8


@dataclass(frozen=True, slots=True)
class Rollback:
    model_name: str
    canary_version: int
    stable_version: int
    verdict: Verdict
    details: dict


class RollbackGuard:
    def __init__(self, policies: Callable[[], list[registry_pb2.TrafficPolicy]],
                 roll_back: Callable[[registry_pb2.TrafficPolicy, str, dict], bool],
                 router_urls: Callable[[], list[str]], fetch=fetch_all, clock=time.monotonic):
        self._policies = policies
        self._roll_back = roll_back  # False when the policy changed meanwhile
        self._router_urls = router_urls
        self._fetch = fetch
        self._clock = clock
        self.window = CountsWindow()

    async def run(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("rollback_guard_failed")
            await asyncio.sleep(interval_s)

    async def check(self) -> list[Rollback]:
        watched = [p for p in await asyncio.to_thread(self._policies)
                   if canary_versions(p) and p.rollback.window_s > 0]
        if not watched:
            return []
        urls = self._router_urls()
        scrapes = await asyncio.to_thread(self._fetch, urls, SCRAPE_TIMEOUT_S)
        self.observe(scrapes)
        rollbacks = self.decide(watched)
        for rollback in rollbacks:
            policy = next(p for p in watched if p.model_name == rollback.model_name)
            done = await asyncio.to_thread(self._roll_back, policy, rollback.verdict.reason, rollback.details)
            log.warning("canary_rolled_back" if done else "canary_rollback_skipped_policy_changed",
                        model=rollback.model_name, version=rollback.canary_version, reason=rollback.verdict.reason)
        return rollbacks

    def observe(self, scrapes: dict) -> None:
        now_s = self._clock()
        for url, scrape in scrapes.items():
            if scrape.snapshot is None:
                self.window.forget(url)  # unreachable: its next page is a new baseline
                continue
            self.window.observe(url, version_counts(scrape.snapshot), now_s)

    def decide(self, policies: list[registry_pb2.TrafficPolicy]) -> list[Rollback]:
        """The canaries to roll back now (at most one rollback per model)."""
        now_s = self._clock()
        rollbacks = []
        for policy in policies:
            bounds = policy.rollback
            stable = self.window.totals((policy.model_name, str(policy.stable_version)), bounds.window_s, now_s)
            for version in canary_versions(policy):
                canary = self.window.totals((policy.model_name, str(version)), bounds.window_s, now_s)
                verdict = judge(canary, stable, bounds)
                if verdict.roll_back:
                    rollbacks.append(Rollback(policy.model_name, version, policy.stable_version, verdict, {
                        "by": "rollback guard", "reason": verdict.reason, "canary_version": version,
                        "stable_version": policy.stable_version, "window_s": bounds.window_s,
                        "canary": _figures(canary), "stable": _figures(stable),
                    }))
                    break
        return rollbacks


def _figures(counts) -> dict:
    return {"requests": counts.num_requests, "errors": counts.num_errors,
            "error_rate": round(counts.error_rate, 4), "mean_latency_s": counts.mean_latency_s}


GUARD_ACTOR = "rollback-guard"


def store_guard(store, discovery) -> RollbackGuard:
    """The guard over the registry's own store and discovery catalog, in-process
    (services/registry/server.py runs it)."""
    from services.common.errors import FailedPrecondition
    from services.registry.codec import policy_from_proto, policy_to_proto
    from services.rollout.promote import stable_only

    def policies() -> list[registry_pb2.TrafficPolicy]:
        return [policy_to_proto(s.traffic_policy) for s in store.describe_models() if s.traffic_policy is not None]

    def roll_back(policy: registry_pb2.TrafficPolicy, reason: str, details: dict) -> bool:
        try:
            store.set_traffic_policy(policy_from_proto(stable_only(policy)), expected_revision=policy.revision,
                                     reason=reason, actor=GUARD_ACTOR, audit_action="rollback",
                                     audit_details=details)
        except FailedPrecondition:  # someone changed the policy since this round read it
            return False
        return True

    return RollbackGuard(policies, roll_back, lambda: router_metrics_urls(discovery.list("router", "")))
