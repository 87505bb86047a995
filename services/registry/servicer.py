"""gRPC servicers of the registry: ModelRegistry (models, versions, blobs, rollouts) and Discovery.

They translate between protos and the store / catalog (services/registry/codec.py); the logic
lives in `store.py`, `blobs.py`, `uploads.py` and `discovery.py`. Database and file I/O run in
worker threads so the event loop keeps serving heartbeats while a large blob streams. Writes
name their caller in the audit log (`caller_actor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.common.admin_auth import caller_actor
from services.common.errors import FailedPrecondition, InvalidArgument
from services.registry import codec
from services.registry.blobs import BlobStore, validate_sha256
from services.registry.discovery import DiscoveryCatalog, InstanceRecord
from services.registry.store import ModelStore
from services.registry.uploads import UploadSpool, validate_upload_id

# Kept importable from here for existing callers.
model_to_proto = codec.model_to_proto
version_to_proto = codec.version_to_proto

BLOB_CHUNK_BYTES = 1 << 20
WATCH_POLL_S = 30.0
_END, _ABORT = object(), object()


class UploadInterrupted(Exception):
    """The client's stream broke: the bytes so far are kept (resumable) or dropped (not)."""


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, store: ModelStore, blobs: BlobStore, uploads: UploadSpool, admin_token: str = ""):
        self._store = store
        self._blobs = blobs
        self._uploads = uploads
        self._admin_token = admin_token

    def _actor(self, context) -> str:
        return caller_actor(context, self._admin_token)

    async def CreateModel(self, request, context):
        model = await asyncio.to_thread(
            self._store.create_model, request.name, request.task, request.description, self._actor(context)
        )
        return codec.model_to_proto(model)

    async def GetModel(self, request, context):
        summary = await asyncio.to_thread(self._store.describe_model, request.name)
        return codec.summary_to_proto(summary)

    async def ListModels(self, request, context):
        summaries = await asyncio.to_thread(self._store.describe_models)
        return registry_pb2.ListModelsResponse(models=[codec.summary_to_proto(s) for s in summaries])

    async def UploadBlob(self, request_iterator, context):
        messages = request_iterator.__aiter__()
        first = await anext(messages, None)
        # Chunks arrive on the loop; hashing and writing happen in a thread fed by a queue.
        queue: asyncio.Queue = asyncio.Queue(maxsize=8)
        loop = asyncio.get_running_loop()

        def chunks():
            while (item := asyncio.run_coroutine_threadsafe(queue.get(), loop).result()) is not _END:
                if item is _ABORT:
                    raise UploadInterrupted("the upload stream broke")
                yield item

        if first is not None and first.upload_id:
            validate_upload_id(first.upload_id)
            work = functools.partial(self._uploads.put, first.upload_id, first.offset, chunks())
        elif first is not None and first.offset:
            raise InvalidArgument("offset needs an upload_id: only a named upload can be resumed")
        else:
            work = functools.partial(self._blobs.put_stream, chunks())
        writer = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            last = first is not None and first.last
            if first is not None:
                await _feed(queue, writer, first.data)
            async for message in messages:
                if last:
                    raise InvalidArgument("a chunk came after the one marked last")
                if message.upload_id or message.offset:
                    raise InvalidArgument("upload_id and offset belong in the first chunk only")
                await _feed(queue, writer, message.data)
                last = message.last
            if first is not None and first.upload_id and not last:
                raise FailedPrecondition(f"upload {first.upload_id!r} ended without a chunk marked last: "
                                         "its bytes are kept for a resume (GetUpload says how many)")
            await _feed(queue, writer, _END)
        except BaseException:
            # Let the writer end (keeping a resumable upload's bytes) before the error goes out.
            with contextlib.suppress(BaseException):
                if not writer.done():
                    await _feed(queue, writer, _ABORT)
                await writer
            raise
        sha256, size_bytes = await writer
        return registry_pb2.BlobRef(sha256=sha256, size_bytes=size_bytes)

    async def GetUpload(self, request, context):
        def work():
            received = self._uploads.held_bytes(request.upload_id) if request.upload_id else 0
            stored = [sha for sha in request.sha256 if self._blobs.exists(validate_sha256(sha))]
            return registry_pb2.GetUploadResponse(received_bytes=received, stored_sha256=stored)

        return await asyncio.to_thread(work)

    async def CreateVersion(self, request, context):
        config = codec.decode_json_object(request.config_json, "config_json")
        version = await asyncio.to_thread(
            self._store.add_version,
            request.model_name,
            codec.files_from_proto(request.files),
            config,
            codec.metadata_from_proto(request.metadata),
            codec.lineage_from_proto(request.lineage),
            codec.gate_from_proto(request.gate),
            self._actor(context),
        )
        return await self._version_proto(version)

    async def GetVersion(self, request, context):
        if request.ref:
            version = await asyncio.to_thread(self._store.get_version_by_ref, request.model_name, request.ref)
        else:
            version = await asyncio.to_thread(self._store.get_version, request.model_name, request.version or None)
        return await self._version_proto(version)

    async def _version_proto(self, version) -> registry_pb2.ModelVersion:
        model = await asyncio.to_thread(self._store.get_model, version.model_name)
        return codec.version_to_proto(version, model.task)

    async def ListVersions(self, request, context):
        versions = await asyncio.to_thread(self._store.list_versions, request.model_name)
        model = await asyncio.to_thread(self._store.get_model, request.model_name)
        return registry_pb2.ListVersionsResponse(versions=[codec.version_to_proto(v, model.task) for v in versions])

    async def DownloadBlob(self, request, context):
        # The bytes go out exactly as stored: the worker verifies the sha256 itself.
        chunks = await asyncio.to_thread(lambda: iter(self._blobs.iter_chunks(request.sha256, BLOB_CHUNK_BYTES)))
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield registry_pb2.BlobChunk(data=chunk)

    async def DeleteVersion(self, request, context):
        await asyncio.to_thread(self._store.delete_version, request.model_name, request.version, self._actor(context))
        return registry_pb2.DeleteVersionResponse()

    async def SetAlias(self, request, context):
        alias = await asyncio.to_thread(
            self._store.set_alias, request.model_name, request.name, request.version, request.reason,
            self._actor(context),
        )
        return codec.alias_to_proto(alias)

    async def DeleteAlias(self, request, context):
        await asyncio.to_thread(
            self._store.delete_alias, request.model_name, request.name, request.reason, self._actor(context)
        )
        return registry_pb2.DeleteAliasResponse()

    async def GetTrafficPolicy(self, request, context):
        policy = await asyncio.to_thread(self._store.get_traffic_policy, request.model_name)
        return codec.policy_to_proto(policy)

    async def SetTrafficPolicy(self, request, context):
        policy = await asyncio.to_thread(
            self._store.set_traffic_policy, codec.policy_from_proto(request.policy), request.expected_revision,
            request.reason, self._actor(context),
        )
        return codec.policy_to_proto(policy)

    async def SetDeployment(self, request, context):
        d = request.deployment
        deployment = await asyncio.to_thread(
            self._store.set_deployment, d.model_name, d.version, d.replicas, request.reason, self._actor(context),
            d.min_replicas, d.max_replicas, d.autoscale,
        )
        return codec.deployment_to_proto(deployment)

    async def ListDeployments(self, request, context):
        deployments = await asyncio.to_thread(self._store.list_deployments, request.model_name)
        return registry_pb2.ListDeploymentsResponse(deployments=[codec.deployment_to_proto(d) for d in deployments])

    async def ListAudit(self, request, context):
        entries = await asyncio.to_thread(
            self._store.list_audit, request.model_name, request.after_sequence, request.limit
        )
        return registry_pb2.ListAuditResponse(entries=[codec.audit_to_proto(e) for e in entries])

    async def AppendAudit(self, request, context):
        details = codec.decode_json_object(request.details_json, "details_json")
        entry = await asyncio.to_thread(
            self._store.append_audit, request.action, request.model_name, request.version, details,
            self._actor(context),
        )
        return codec.audit_to_proto(entry)

    async def VerifyStore(self, request, context):
        report = await asyncio.to_thread(self._store.verify, request.rehash)
        return codec.verify_to_proto(report)


async def _feed(queue: asyncio.Queue, writer: asyncio.Future, item: object) -> None:
    """Put `item` for the writer thread, unless the writer has already ended (then raise its
    error, e.g. a resume at the wrong offset, instead of waiting on a queue nobody reads)."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        await writer
        raise UploadInterrupted("the blob writer ended before the stream")


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
