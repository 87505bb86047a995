"""The router's view of the workers: who serves what, and how busy each one is right now.

The pool follows discovery's watch stream: a worker appears once it has registered (which it does
only when ready) and disappears when it deregisters (drain) or its lease expires. Each backend keeps
one channel and a count of requests this router has outstanding on it; `pick` takes the least
loaded backend of the model (ties broken at random, so equal replicas share the work).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import grpc

from protos.tensoryard.v1 import discovery_pb2
from services.common.discovery import DiscoveryClient
from services.common.grpc_server import aio_channel
from services.common.telemetry import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class Backend:
    instance: discovery_pb2.Instance
    channel: grpc.aio.Channel
    num_outstanding: int = 0
    # Channel call objects by method: creating one per request costs more than the call itself.
    _calls: dict[str, object] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.instance.model_name

    @property
    def model_version(self) -> str:
        return self.instance.model_version

    def unary(self, method: str):
        """A raw unary call: bytes in, bytes out, nothing (de)serialized."""
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.unary_unary(method)
        return call

    def unary_stream(self, method: str):
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.unary_stream(method)
        return call

    def stream_stream(self, method: str):
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.stream_stream(method)
        return call


class BackendPool:
    def __init__(self, discovery: DiscoveryClient, max_message_bytes: int):
        self._discovery = discovery
        self._max_message_bytes = max_message_bytes
        self._backends: dict[str, Backend] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for instances in self._discovery.watch(service="worker"):
            self._apply(instances)
            self.synced.set()

    def _apply(self, instances: list[discovery_pb2.Instance]) -> None:
        current = {i.instance_id: i for i in instances}
        for instance_id in list(self._backends):
            if instance_id not in current or current[instance_id].address != self._backends[instance_id].instance.address:
                backend = self._backends.pop(instance_id)
                log.info("backend_removed", worker=instance_id, model=backend.model_name)
                # Requests already sent finish on the old channel; close it once they have.
                asyncio.get_running_loop().call_later(30, lambda c=backend.channel: asyncio.ensure_future(c.close()))
        for instance_id, instance in current.items():
            if instance_id not in self._backends:
                self._backends[instance_id] = Backend(
                    instance, aio_channel(instance.address, self._max_message_bytes)
                )
                log.info("backend_added", worker=instance_id, model=instance.model_name,
                         version=instance.model_version, address=instance.address)

    def backends(self, model_name: str = "", model_version: str = "") -> list[Backend]:
        return [
            b
            for b in self._backends.values()
            if (not model_name or b.model_name == model_name)
            and (not model_version or b.model_version == model_version)
        ]

    def pick(self, model_name: str, model_version: str = "", exclude: Backend | None = None) -> Backend | None:
        candidates = [b for b in self.backends(model_name, model_version) if b is not exclude]
        if not candidates:
            return None
        least = min(b.num_outstanding for b in candidates)
        return random.choice([b for b in candidates if b.num_outstanding == least])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for backend in self._backends.values():
            await backend.channel.close()
