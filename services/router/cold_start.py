"""Scale from zero: a request for a deployment at zero replicas waits, bounded, for its first replica.

A deployment autoscaled with a min of 0 has no replica after an idle window (services/autoscale/
policy.py). A request that then finds no routable replica of it is *held* here instead of refused:

- the router counts it in the scaling signals, discovery KV
  `tensoryard/deployments/<model>/<version>/held/<router id>` (`HeldSignals`; the layout is
  services/common/scaling_keys.py's), which the registry's
  autoscaler reads and answers by scaling the deployment to one replica;
- the request goes on the moment a replica of that version is routable (its worker has registered
  and sent its first load report);
- bounds: at most `max_held` requests per model wait (one more is refused at once with
  RESOURCE_EXHAUSTED and a retry hint), each for at most `hold_s` (then UNAVAILABLE saying so) or
  its own deadline, whichever comes first (gRPC cancels the call, and the count goes down).

Only deployments that scale to zero hold requests: a model with no replica and no such deployment
is refused at once as before (holding would only delay the same answer).

Which version a request that names none waits for: the traffic policy's choice among the versions
that scale to zero (`traffic.choose_version`: the production alias, else the latest).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping

from services.common.errors import Overloaded, Unavailable
from services.common.scaling_keys import held_key, held_value
from services.common.telemetry import get_logger
from services.router import metrics
from services.router.catalog import CatalogModel, ModelCatalog
from services.router.policies import RouteRequest
from services.router.traffic import choose_version

log = get_logger(__name__)

# How often a held request looks for a routable replica: a replica's first load report is what
# makes it routable, and reports come every 50 ms.
POLL_S = 0.05
# While requests are held, the count is written again this often, so the autoscaler can tell a
# router that went away (its entry gets old) from one still waiting.
REFRESH_S = 2.0


class HeldSignals:
    """This router's held counts, published into the discovery KV on every change (at most every
    `min_interval_s`) and every REFRESH_S while non-zero; a count back at zero is deleted."""

    def __init__(self, discovery, router_id: str, min_interval_s: float = 0.1):
        self._discovery = discovery  # any backend of services/common/discovery_backends.py
        self._router_id = router_id
        self._min_interval_s = min_interval_s
        self._counts: Counter[tuple[str, int]] = Counter()
        self._published: set[tuple[str, int]] = set()
        self._dirty = asyncio.Event()

    def add(self, model_name: str, version: int, delta: int) -> None:
        key = (model_name, version)
        self._counts[key] += delta
        if self._counts[key] <= 0:
            del self._counts[key]
        self._dirty.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), REFRESH_S if self._counts else None)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._publish()
            except Exception as error:  # noqa: BLE001 - discovery away: the next change or refresh retries
                log.warning("held_requests_publish_failed", error=str(error))
                self._dirty.set()
                await asyncio.sleep(1.0)
            await asyncio.sleep(self._min_interval_s)

    async def _publish(self) -> None:
        for (model_name, version), count in list(self._counts.items()):
            await self._discovery.kv_put(held_key(model_name, version, self._router_id), held_value(count))
            self._published.add((model_name, version))
        for key in [k for k in self._published if k not in self._counts]:
            await self._discovery.kv_delete(held_key(*key, self._router_id))
            self._published.discard(key)


class ColdStartHold:
    def __init__(self, pool, catalog: ModelCatalog, signals: HeldSignals | None, hold_s: float = 60.0,
                 max_held: int = 256, rng: random.Random | None = None):
        self._pool = pool  # services.router.pool.BackendPool
        self._catalog = catalog
        self._signals = signals
        self.hold_s = hold_s
        self.max_held = max_held
        self._rng = rng or random.Random()
        self._held: Counter[str] = Counter()  # by model

    @property
    def enabled(self) -> bool:
        return self.hold_s > 0 and self.max_held > 0

    def version_to_wait_for(self, model: CatalogModel | None, request_values: Mapping[str, str]) -> int | None:
        """For a request that names no version and finds none ready: the version it may wait for."""
        if not self.enabled or model is None:
            return None
        waiting = self._catalog.scale_to_zero_versions(model.name)
        if not waiting:
            return None
        version = choose_version(model.policy, model.aliases, waiting, request_values, self._rng).version
        return version if version in waiting else None

    def can_hold(self, model_name: str, version: str = "") -> bool:
        """Whether requests for this version ("": any version) would wait for a first replica here
        rather than be refused: ready in the sense a caller needs."""
        if not self.enabled:
            return False
        if not version:
            return bool(self._catalog.scale_to_zero_versions(model_name))
        return version.isdigit() and self._catalog.scales_to_zero(model_name, int(version))

    def holds(self, route: RouteRequest) -> bool:
        """For a request whose version is settled."""
        return bool(route.model_version) and self.can_hold(route.model_name, route.model_version)

    async def wait(self, route: RouteRequest) -> None:
        """Return once a replica of the route's version is routable; raise when the bounds say no."""
        model_name, version = route.model_name, int(route.model_version)
        if self._held[model_name] >= self.max_held:
            metrics.REJECTED.labels(model_name, "held_full").inc()
            raise Overloaded(f"{self.max_held} requests already wait for a first replica of model '{model_name}'; "
                             "retry shortly", retry_after_s=1.0)
        self._held[model_name] += 1
        if self._signals is not None:
            self._signals.add(model_name, version, 1)
        started_s = time.monotonic()
        if self._held[model_name] == 1:
            log.info("request_held_for_first_replica", model=model_name, version=version, hold_s=self.hold_s)
        try:
            while not self._pool.routable(model_name, route.model_version):
                if time.monotonic() - started_s >= self.hold_s:
                    metrics.REJECTED.labels(model_name, "held_timeout").inc()
                    raise Unavailable(f"no replica of model '{model_name}' version {version} became ready within "
                                      f"{self.hold_s:g} s of scaling from zero; retry shortly")
                await asyncio.sleep(POLL_S)
        finally:
            self._held[model_name] -= 1
            if not self._held[model_name]:
                del self._held[model_name]
            if self._signals is not None:
                self._signals.add(model_name, version, -1)
        metrics.HELD_SECONDS.labels(model_name).observe(time.monotonic() - started_s)

    def num_held(self, model_name: str) -> int:
        return self._held[model_name]
