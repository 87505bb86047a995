"""Client of the embedded discovery service (the registry's tensoryard.v1.Discovery).

`register` keeps an instance listed by renewing its lease at a third of the TTL and registers
again if the lease was lost (registry restart, long pause). `watch` yields the instance list each
time it changes and reconnects, with backoff, when the registry goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc
from services.common.telemetry import get_logger

log = get_logger(__name__)

RECONNECT_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)


class Registration:
    """One registered instance and the task that keeps its lease alive."""

    def __init__(self, stub, instance: discovery_pb2.Instance, ttl_ms: int):
        self._stub = stub
        self.instance = instance
        self.ttl_ms = ttl_ms
        self.lease_id = ""
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._keep_alive())

    async def _register(self) -> None:
        response = await self._stub.Register(
            discovery_pb2.RegisterRequest(instance=self.instance, ttl_ms=self.ttl_ms), timeout=5
        )
        self.lease_id = response.lease_id

    async def _keep_alive(self) -> None:
        interval_s = self.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._stub.Heartbeat(
                    discovery_pb2.HeartbeatRequest(lease_id=self.lease_id), timeout=interval_s
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("lease_lost_registering_again", instance_id=self.instance.instance_id)
                    await self._try(self._register)
                else:
                    log.warning("heartbeat_failed", code=error.code().name, details=error.details())

    async def _try(self, call) -> None:
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            log.warning("discovery_call_failed", code=error.code().name, details=error.details())

    async def stop(self) -> None:
        """Stop renewing and deregister, so routers stop sending work here at once."""
        if self._task is not None:
            self._task.cancel()
        await self._try(
            lambda: self._stub.Deregister(
                discovery_pb2.DeregisterRequest(instance_id=self.instance.instance_id), timeout=5
            )
        )


class DiscoveryClient:
    def __init__(self, channel: grpc.aio.Channel, owns_channel: bool = False):
        self._channel = channel
        self._owns_channel = owns_channel  # made for this client (discovery_backends): close closes it
        self._stub = discovery_pb2_grpc.DiscoveryStub(channel)

    async def register(self, instance: discovery_pb2.Instance, ttl_ms: int, healthy=None) -> Registration:
        """`healthy` is for the Consul backend's TTL check; the embedded lease does not use it: it
        lists an instance while its process renews the lease, and routers learn of a stalled engine
        from the worker's load stream at once."""
        registration = Registration(self._stub, instance, ttl_ms)
        await registration.start()
        return registration

    async def list(self, service: str = "", model_name: str = "") -> list[discovery_pb2.Instance]:
        response = await self._stub.List(
            discovery_pb2.ListRequest(service=service, model_name=model_name), timeout=5
        )
        return list(response.instances)

    async def watch(self, service: str = "", model_name: str = "") -> AsyncIterator[list[discovery_pb2.Instance]]:
        """Yields the full instance list now and after every change, forever."""
        attempt = 0
        after_index = 0
        while True:
            try:
                stream = self._stub.Watch(
                    discovery_pb2.WatchRequest(service=service, model_name=model_name, after_index=after_index)
                )
                async for response in stream:
                    attempt = 0
                    after_index = response.index
                    yield list(response.instances)
            except grpc.aio.AioRpcError as error:
                log.warning("discovery_watch_lost", code=error.code().name, details=error.details())
            # A restarted registry starts its index again: ask for everything.
            after_index = 0
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
            attempt += 1

    # -- KV: scaling signals (services/autoscale/) ------------------------------------------------

    async def kv_put(self, key: str, value: bytes) -> None:
        await self._stub.KVPut(discovery_pb2.KVPutRequest(key=key, value=value), timeout=5)

    async def kv_list(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every key under `prefix`, sorted by key."""
        response = await self._stub.KVGet(discovery_pb2.KVGetRequest(key=prefix, prefix=True), timeout=5)
        return sorted((e.key, e.value) for e in response.entries)

    async def kv_delete(self, key: str) -> None:
        await self._stub.KVDelete(discovery_pb2.KVDeleteRequest(key=key), timeout=5)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()
