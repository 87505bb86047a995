"""gRPC servicers of the registry: ModelRegistry (models, versions, blobs) and Discovery.

They translate between protos and the store / catalog; the logic lives in `store.py`,
`blobs.py` and `discovery.py`. SQLite and file I/O run in worker threads so the event loop keeps
serving heartbeats while a large blob streams.
"""

from __future__ import annotations

import asyncio
import json

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.common.errors import InvalidArgument
from services.registry.blobs import BlobStore
from services.registry.discovery import DiscoveryCatalog, InstanceRecord
from services.registry.records import FileRecord, ModelRecord, VersionRecord
from services.registry.store import ModelStore

BLOB_CHUNK_BYTES = 1 << 20
WATCH_POLL_S = 30.0


def model_to_proto(model: ModelRecord, versions: list[int]) -> registry_pb2.Model:
    return registry_pb2.Model(
        name=model.name,
        task=model.task,
        description=model.description,
        created_at_s=model.created_at_s,
        versions=versions,
    )


def version_to_proto(version: VersionRecord, task: str = "") -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        model_name=version.model_name,
        version=version.version,
        files=[
            registry_pb2.ModelFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in version.files
        ],
        config_json=json.dumps(version.config, sort_keys=True),
        created_at_s=version.created_at_s,
        task=task,
    )


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, store: ModelStore, blobs: BlobStore):
        self._store = store
        self._blobs = blobs

    async def CreateModel(self, request, context):
        model = await asyncio.to_thread(
            self._store.create_model, request.name, request.task, request.description
        )
        return model_to_proto(model, [])

    async def GetModel(self, request, context):
        model = await asyncio.to_thread(self._store.get_model, request.name)
        return await asyncio.to_thread(self._model_proto, model)

    async def ListModels(self, request, context):
        def all_models():
            return [self._model_proto(m) for m in self._store.list_models()]

        return registry_pb2.ListModelsResponse(models=await asyncio.to_thread(all_models))

    def _model_proto(self, model: ModelRecord) -> registry_pb2.Model:
        return model_to_proto(model, self._store.version_numbers(model.name))

    async def UploadBlob(self, request_iterator, context):
        # Chunks arrive on the loop; hashing and writing happen in a thread fed by a queue.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        loop = asyncio.get_running_loop()

        def chunks():
            while (chunk := asyncio.run_coroutine_threadsafe(queue.get(), loop).result()) is not None:
                yield chunk

        writer = asyncio.create_task(asyncio.to_thread(self._blobs.put_stream, chunks()))
        try:
            async for message in request_iterator:
                await queue.put(message.data)
        finally:
            await queue.put(None)
        sha256, size_bytes = await writer
        return registry_pb2.BlobRef(sha256=sha256, size_bytes=size_bytes)

    async def CreateVersion(self, request, context):
        try:
            config = json.loads(request.config_json or "{}")
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"config_json is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise InvalidArgument("config_json must be a JSON object")
        files = [FileRecord(f.path, f.sha256, f.size_bytes) for f in request.files]
        version = await asyncio.to_thread(self._store.add_version, request.model_name, files, config)
        model = await asyncio.to_thread(self._store.get_model, request.model_name)
        return version_to_proto(version, model.task)

    async def GetVersion(self, request, context):
        version = await asyncio.to_thread(
            self._store.get_version, request.model_name, request.version or None
        )
        model = await asyncio.to_thread(self._store.get_model, request.model_name)
        return version_to_proto(version, model.task)

    async def ListVersions(self, request, context):
        versions = await asyncio.to_thread(self._store.list_versions, request.model_name)
        model = await asyncio.to_thread(self._store.get_model, request.model_name)
        return registry_pb2.ListVersionsResponse(
            versions=[version_to_proto(v, model.task) for v in versions]
        )

    async def DownloadBlob(self, request, context):
        # The bytes go out exactly as stored: the worker verifies the sha256 itself.
        chunks = await asyncio.to_thread(
            lambda: iter(self._blobs.iter_chunks(request.sha256, BLOB_CHUNK_BYTES))
        )
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield registry_pb2.BlobChunk(data=chunk)


def instance_to_proto(instance: InstanceRecord) -> discovery_pb2.Instance:
    return discovery_pb2.Instance(
        instance_id=instance.instance_id,
        service=instance.service,
        address=instance.address,
        model_name=instance.model_name,
        model_version=instance.model_version,
        metadata=instance.metadata,
    )


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServicer):
    def __init__(self, catalog: DiscoveryCatalog, default_ttl_ms: int):
        self._catalog = catalog
        self._default_ttl_ms = default_ttl_ms

    async def Register(self, request, context):
        i = request.instance
        lease_id = self._catalog.register(
            InstanceRecord(
                instance_id=i.instance_id,
                service=i.service,
                address=i.address,
                model_name=i.model_name,
                model_version=i.model_version,
                metadata=dict(i.metadata),
                lease_id="",
                ttl_ms=request.ttl_ms or self._default_ttl_ms,
                expires_at_s=0.0,
            )
        )
        return discovery_pb2.RegisterResponse(lease_id=lease_id)

    async def Heartbeat(self, request, context):
        self._catalog.heartbeat(request.lease_id)
        return discovery_pb2.HeartbeatResponse()

    async def Deregister(self, request, context):
        self._catalog.deregister(request.instance_id)
        return discovery_pb2.DeregisterResponse()

    async def List(self, request, context):
        return self._list(request.service, request.model_name)

    def _list(self, service: str, model_name: str) -> discovery_pb2.ListResponse:
        return discovery_pb2.ListResponse(
            instances=[instance_to_proto(i) for i in self._catalog.list(service, model_name)],
            index=self._catalog.index,
        )

    async def Watch(self, request, context):
        seen_index = request.after_index
        while True:
            if self._catalog.index > seen_index:
                response = self._list(request.service, request.model_name)
                seen_index = response.index
                yield response
            await self._catalog.wait_for_change(seen_index, WATCH_POLL_S)

    async def KVGet(self, request, context):
        return discovery_pb2.KVGetResponse(
            entries=[
                discovery_pb2.KVEntry(key=r.key, value=r.value, modify_index=r.modify_index)
                for r in self._catalog.kv_get(request.key, request.prefix)
            ]
        )

    async def KVPut(self, request, context):
        cas = request.cas_index if request.HasField("cas_index") else None
        ok, index = self._catalog.kv_put(request.key, request.value, cas)
        return discovery_pb2.KVPutResponse(ok=ok, modify_index=index)

    async def KVDelete(self, request, context):
        self._catalog.kv_delete(request.key)
        return discovery_pb2.KVDeleteResponse()
