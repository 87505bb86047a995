"""What the registry's controllers (the autoscaler, the rollback guard) see of the fleet: the
instances discovery lists, and the discovery KV where scaling signals live.

- `EmbeddedFleet`: the registry's own catalog, in this process (the default);
- `ConsulFleet` (`--discovery consul://host:port`): Consul's passing instances, followed with the
  blocking watch the routers use (services/common/discovery_consul.py), so `list` answers from
  memory as the embedded catalog does; KV reads and writes go to the agent.

Both: `list(service, model_name)` (now, no I/O), `await kv_put(key, value)`,
`await kv_list(prefix)`, `start()`, `await close()`.
"""

from __future__ import annotations

import asyncio

from services.common.telemetry import get_logger

log = get_logger(__name__)

# The services the controllers read: workers (signals) and routers (the guard's metrics).
FOLLOWED_SERVICES = ("worker", "router")


class EmbeddedFleet:
    def __init__(self, catalog):
        self._catalog = catalog  # services/registry/discovery.py DiscoveryCatalog

    def start(self) -> None:
        return None

    def list(self, service: str, model_name: str = "") -> list:
        return self._catalog.list(service, model_name)

    async def kv_put(self, key: str, value: bytes) -> None:
        self._catalog.kv_put(key, value)

    async def kv_list(self, prefix: str) -> list[tuple[str, bytes]]:
        return [(r.key, r.value) for r in self._catalog.kv_get(prefix, prefix=True)]

    async def close(self) -> None:
        return None


class ConsulFleet:
    def __init__(self, discovery):
        self.discovery = discovery  # services/common/discovery_consul.py ConsulDiscovery
        self._instances: dict[str, list] = {service: [] for service in FOLLOWED_SERVICES}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(service)) for service in FOLLOWED_SERVICES]

    async def _follow(self, service: str) -> None:
        async for instances in self.discovery.watch(service):
            self._instances[service] = instances

    def list(self, service: str, model_name: str = "") -> list:
        return [i for i in self._instances.get(service, []) if not model_name or i.model_name == model_name]

    async def kv_put(self, key: str, value: bytes) -> None:
        await self.discovery.kv_put(key, value)

    async def kv_list(self, prefix: str) -> list[tuple[str, bytes]]:
        return await self.discovery.kv_list(prefix)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.discovery.close()
