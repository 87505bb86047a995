"""Which models and versions exist, from the registry, so the router can tell NOT_FOUND
(no such model or version) from UNAVAILABLE (it exists, but no replica is ready now).

The list is cached and refreshed at most every `refresh_interval_s` when a lookup misses, so a
stream of requests for an unknown model costs the registry one call per interval, not one each.
"""

from __future__ import annotations

import time

import grpc

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import NotFound, Unavailable


class ModelCatalog:
    def __init__(self, channel: grpc.aio.Channel, refresh_interval_s: float = 1.0):
        self._stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self._refresh_interval_s = refresh_interval_s
        self._versions: dict[str, list[int]] = {}
        self._tasks: dict[str, str] = {}
        self._refreshed_at = float("-inf")

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed_at < self._refresh_interval_s:
            return
        try:
            response = await self._stub.ListModels(registry_pb2.ListModelsRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"the model registry is unreachable: {error.details()}") from None
        self._versions = {m.name: sorted(m.versions) for m in response.models}
        self._tasks = {m.name: m.task for m in response.models}
        self._refreshed_at = now

    def models(self) -> dict[str, list[int]]:
        return dict(self._versions)

    def task(self, model_name: str) -> str | None:
        """"generation", "embedding", ... or None for a model not seen in the registry yet."""
        return self._tasks.get(model_name)

    async def check(self, model_name: str, model_version: str) -> None:
        """Raise NotFound unless the model (and version, if given) exists in the registry."""
        if not self._exists(model_name, model_version):
            await self.refresh()
        if model_name not in self._versions:
            raise NotFound(f"unknown model '{model_name}': it is not in the model registry")
        if model_version and not self._exists(model_name, model_version):
            known = ", ".join(str(v) for v in self._versions[model_name]) or "none"
            raise NotFound(f"model '{model_name}' has no version '{model_version}' (versions: {known})")

    def _exists(self, model_name: str, model_version: str) -> bool:
        versions = self._versions.get(model_name)
        if versions is None:
            return False
        return not model_version or (model_version.isdigit() and int(model_version) in versions)
