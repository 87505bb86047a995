"""Discovery on Consul: the same interface as the embedded catalog (`discovery.DiscoveryClient`).

Written against Consul's documented HTTP API (agent service registration, TTL checks, health
queries with blocking `index`/`wait`); the Consul binary cannot be installed here, so the tests run
it against the stand-in in tests/support/, which follows the same documents.

Registering: an instance becomes an agent service (ID = instance_id, Name = `tensoryard-<service>`,
Address and Port from its address, Meta as `consul_meta.py` encodes it) with one TTL check. The
check starts critical unless the instance says it is healthy, and `DeregisterCriticalServiceAfter`
lets the agent remove an instance that died without deregistering. What feeds the TTL is the
instance's own health, `healthy()` — for a worker, the state that also turns its gRPC health
NOT_SERVING when the engine stops making progress — not a timer: while healthy, a pass every third
of the TTL; when it turns unhealthy, a fail at once (routers drop it on their next blocking answer,
not a TTL later); a frozen process sends nothing and goes critical when its TTL runs out. An update
that Consul answers "unknown check" (the agent lost it: restarted without its state, or reaped it)
registers again. `stop()` deregisters.

Watching: `GET /v1/health/service/<name>?passing=true` as a blocking query, following Consul's rules
for clients: the index is reset to 0 when it goes backwards and never left below 1; a new query
starts at most every `min_interval_s` (an index that jumps on every write would otherwise be a tight
loop); on an error the last good set stands (nothing is yielded: Consul being away is no reason to
route nowhere) and the query is retried with backoff. After an outage, or an index that went
backwards, an agent may answer before the instances have registered again: for `resync_grace_s`
instances missing from its answers are kept, then the answer is taken as it is.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

from protos.tensoryard.v1 import discovery_pb2
from services.common.consul_http import ConsulError, ConsulHttp, ConsulUnavailable
from services.common.consul_meta import consul_service_name, instance_from_entry, service_definition
from services.common.telemetry import get_logger

log = get_logger(__name__)

RECONNECT_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
# How often a registration looks at healthy() between its scheduled passes.
HEALTH_POLL_S = 0.25


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query (Consul's "Implementation Details" for clients)."""
    if returned < previous:
        return 0  # went backwards (a restored snapshot, a new cluster): read everything again
    return max(returned, 1)  # 0 would not block: a busy loop


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


class ConsulRegistration:
    """One instance registered with the local agent, and the task that feeds its TTL check."""

    def __init__(self, http: ConsulHttp, instance: discovery_pb2.Instance, ttl_ms: int,
                 healthy: Callable[[], bool], deregister_critical_after_s: float):
        if ttl_ms < 100:
            raise ValueError(f"ttl_ms must be >= 100, not {ttl_ms}")
        self._http = http
        self.instance = instance
        self.ttl_ms = ttl_ms
        self.check_id = f"service:{instance.instance_id}"
        self._healthy = healthy
        self._deregister_after_s = deregister_critical_after_s
        self._reported: bool | None = None  # the status Consul was last told (True: passing)
        self._task: asyncio.Task | None = None
        self._definition = service_definition(instance, self._check(False))  # refuses bad input now

    def _check(self, healthy: bool) -> dict:
        return {
            "CheckID": self.check_id,
            "Name": "tensoryard serving",
            "Notes": "passes while the instance serves (a worker: while its engine makes progress)",
            "TTL": _duration(self.ttl_ms / 1000),
            "Status": "passing" if healthy else "critical",
            "DeregisterCriticalServiceAfter": _duration(self._deregister_after_s),
        }

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._keep_alive())

    async def _register(self) -> None:
        healthy = self._healthy()
        await self._http.put("/v1/agent/service/register", {**self._definition, "Check": self._check(healthy)})
        self._reported = healthy

    async def _keep_alive(self) -> None:
        interval_s = self.ttl_ms / 3000
        last_sent_s = time.monotonic()
        unreachable = False
        while True:
            await asyncio.sleep(min(HEALTH_POLL_S, interval_s))
            healthy = self._healthy()
            if healthy == self._reported and time.monotonic() - last_sent_s < interval_s:
                continue
            try:
                await self._update(healthy)
                last_sent_s = time.monotonic()
                if unreachable:
                    log.info("consul_reachable_again", instance_id=self.instance.instance_id)
                unreachable = False
            except ConsulError as error:
                if error.status in (404, 500):  # "Unknown check ID": the agent no longer has it
                    log.warning("consul_check_lost_registering_again", instance_id=self.instance.instance_id,
                                error=str(error))
                    await self._try(self._register)
                    last_sent_s = time.monotonic()
                else:
                    log.error("consul_check_update_refused", instance_id=self.instance.instance_id, error=str(error))
            except ConsulUnavailable as error:
                if not unreachable:
                    log.warning("consul_unreachable", instance_id=self.instance.instance_id, error=str(error))
                unreachable = True

    async def _update(self, healthy: bool) -> None:
        verb, note = ("pass", "serving") if healthy else ("fail", "not serving: engine stalled, loading or draining")
        await self._http.put(f"/v1/agent/check/{verb}/{quote(self.check_id, safe='')}", params={"note": note})
        if healthy != self._reported:
            log.info("consul_check_status", instance_id=self.instance.instance_id, status=verb)
        self._reported = healthy

    async def _try(self, call) -> None:
        try:
            await call()
        except (ConsulError, ConsulUnavailable) as error:
            log.warning("consul_call_failed", instance_id=self.instance.instance_id, error=str(error))

    async def stop(self) -> None:
        """Stop feeding the check and deregister, so routers stop sending work here at once."""
        if self._task is not None:
            self._task.cancel()
        await self._try(lambda: self._http.put(
            f"/v1/agent/service/deregister/{quote(self.instance.instance_id, safe='')}"))


class ConsulDiscovery:
    def __init__(self, base_url: str, token: str = "", *, wait_s: float = 30.0, min_interval_s: float = 0.1,
                 resync_grace_s: float = 10.0, deregister_critical_after_s: float = 60.0):
        if wait_s < 1 or wait_s > 600:
            raise ValueError(f"wait_s must be 1..600 (Consul caps a blocking query at 10 minutes), not {wait_s}")
        if deregister_critical_after_s < 60:
            raise ValueError("deregister_critical_after_s must be >= 60 (Consul's minimum is one minute), "
                             f"not {deregister_critical_after_s}")
        self._http = ConsulHttp(base_url, token)
        self.base_url = self._http.base_url
        self._wait_s = wait_s
        self._min_interval_s = min_interval_s
        self._resync_grace_s = resync_grace_s
        self._deregister_after_s = deregister_critical_after_s

    async def register(self, instance: discovery_pb2.Instance, ttl_ms: int,
                       healthy: Callable[[], bool] | None = None) -> ConsulRegistration:
        """Register and keep the TTL check fed from `healthy()` (None: healthy while the process runs)."""
        registration = ConsulRegistration(self._http, instance, ttl_ms, healthy or (lambda: True),
                                          self._deregister_after_s)
        await registration.start()
        return registration

    async def list(self, service: str = "", model_name: str = "") -> list[discovery_pb2.Instance]:
        """The passing instances now (one plain read)."""
        entries, _ = await self._http.get(self._health_path(service), {"passing": "true"})
        return _instances(entries, service, model_name)

    async def watch(self, service: str = "", model_name: str = "") -> AsyncIterator[list[discovery_pb2.Instance]]:
        """Yields the passing instances at once and after every change, forever."""
        path = self._health_path(service)
        index = 0  # sent with the next query; 0: a plain read that returns at once
        last_index = 0  # the index of the last good answer
        attempt = 0
        last: dict[str, discovery_pb2.Instance] | None = None  # the set last yielded: the last good one
        resync_until_s = 0.0  # while now < this, instances missing from answers are kept
        next_start_s = 0.0
        while True:
            now = time.monotonic()
            if now < next_start_s:
                await asyncio.sleep(next_start_s - now)
            next_start_s = time.monotonic() + self._min_interval_s
            wait_s = self._wait_s
            if resync_until_s:  # come back when the grace ends, to drop what did not return
                wait_s = min(wait_s, max(1, math.ceil(resync_until_s - time.monotonic())))
            try:
                entries, returned = await self._http.blocking_get(path, {"passing": "true"}, index, wait_s)
            except (ConsulUnavailable, ConsulError) as error:
                if attempt == 0:
                    log.warning("consul_watch_failed_keeping_last_set", consul_service=service, error=str(error),
                                num_instances=len(last or {}))
                await asyncio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
                attempt += 1
                # Reconnect with a plain read: an agent that restarted has a lower index, and a query
                # blocking at ours would hang for its whole wait before saying so.
                index = 0
                if last is not None:
                    resync_until_s = time.monotonic() + self._resync_grace_s
                continue
            if attempt:
                log.info("consul_watch_resumed", consul_service=service, after_attempts=attempt)
            attempt = 0
            if returned < last_index and last is not None:
                log.warning("consul_index_went_backwards", consul_service=service, previous=last_index, returned=returned)
                resync_until_s = time.monotonic() + self._resync_grace_s
            index = next_index(index, returned)
            last_index = returned
            current = {i.instance_id: i for i in _instances(entries, service, model_name)}
            if resync_until_s and time.monotonic() < resync_until_s:
                current = {**last, **current}
            else:
                resync_until_s = 0.0
            if current != last:
                last = current
                yield list(current.values())

    # -- KV: scaling signals (services/autoscale/) ------------------------------------------------

    @property
    def http(self) -> ConsulHttp:
        """The agent's HTTP client, for what else talks to the same agent (the leader lock)."""
        return self._http

    async def kv_put(self, key: str, value: bytes) -> None:
        await self._http.put_raw(_kv_path(key), value)

    async def kv_list(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every key under `prefix`, sorted by key; [] when there is none."""
        try:
            entries, _ = await self._http.get(_kv_path(prefix), {"recurse": "true"})
        except ConsulError as error:
            if error.status == 404:  # Consul's answer for "no such key"
                return []
            raise
        return sorted((e["Key"], base64.b64decode(e["Value"] or b"")) for e in entries or [])

    async def kv_delete(self, key: str) -> None:
        await self._http.delete(_kv_path(key))

    def _health_path(self, service: str) -> str:
        return f"/v1/health/service/{quote(consul_service_name(service), safe='')}"

    async def close(self) -> None:
        await self._http.close()


def _kv_path(key: str) -> str:
    return "/v1/kv/" + quote(key, safe="/")


def _instances(entries, service: str, model_name: str) -> list[discovery_pb2.Instance]:
    instances = [instance_from_entry(entry, service) for entry in entries or []]
    return [i for i in instances if not model_name or i.model_name == model_name]
