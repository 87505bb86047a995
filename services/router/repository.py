"""Triton's model-repository RPCs on the router, over the registry's deployments.

RepositoryIndex lists every version the registry holds: READY while this router has a routable
replica of it, else UNAVAILABLE with why (not deployed, or deployed and not ready yet).
RepositoryModelLoad sets a deployment of the version named by the `version` parameter (default:
the latest) to at least one replica and answers once the router can route to one (a deployment
controller starts the worker: `tensoryard up`'s local one), or with the failure as soon as the
controller reports the worker exited (`deployment.failed` on the audit log); RepositoryModelUnload sets the named
version, or every version of the model, to 0. The registry decides who may: the caller's
`authorization` (admin token) metadata goes with the write.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from protos.inference import grpc_service_pb2 as pb
from protos.tensoryard.v1 import registry_pb2
from services.common.admin_auth import ADMIN_TOKEN_HEADER, AUTHORIZATION_HEADER
from services.common.errors import (
    InvalidArgument,
    NotFound,
    TensoryardError,
    Unavailable,
)
from services.router.catalog import ModelCatalog
from services.router.pool import BackendPool

LOAD_TIMEOUT_S = 180.0
FAILURE_CHECK_INTERVAL_S = 1.0  # how often a load in progress asks whether its worker exited
CALL_TIMEOUT_S = 10.0
VERSION_PARAMETER = "version"


class RegistryRefused(TensoryardError):
    """The registry's own answer (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ...), passed on."""

    def __init__(self, error: grpc.aio.AioRpcError):
        super().__init__(f"the model registry refused: {error.details()}")
        self.code = error.code()


class ModelRepository:
    def __init__(self, registry_stub, catalog: ModelCatalog, pool: BackendPool):
        self._registry = registry_stub
        self._catalog = catalog
        self._pool = pool

    async def index(self, request, context) -> pb.RepositoryIndexResponse:
        await self._catalog.refresh(force=True)
        try:
            wanted = await self._deployments("")
        except RegistryRefused:  # the index still says what is ready; only the reasons are vaguer
            wanted = {}
        models = []
        for name, versions in sorted(self._catalog.models().items()):
            for version in versions:
                ready = bool(self._pool.routable(name, str(version)))
                if request.ready and not ready:
                    continue
                models.append(pb.RepositoryIndexResponse.ModelIndex(
                    name=name, version=str(version), state="READY" if ready else "UNAVAILABLE",
                    reason="" if ready else _why_unavailable(wanted.get((name, version))),
                ))
        return pb.RepositoryIndexResponse(models=models)

    async def load(self, request, context) -> pb.RepositoryModelLoadResponse:
        version = await self._version(request.model_name, request.parameters, latest_if_unset=True)
        wanted = (await self._deployments(request.model_name)).get((request.model_name, version), 0)
        if wanted < 1:
            await self._set_deployment(request.model_name, version, 1, context, "RepositoryModelLoad")
        remaining_s = context.time_remaining()
        timeout_s = min(remaining_s - 0.5, LOAD_TIMEOUT_S) if remaining_s is not None else LOAD_TIMEOUT_S
        deadline_s = time.monotonic() + timeout_s
        audited = await self._last_audit_sequence(request.model_name)
        next_check_s = time.monotonic() + FAILURE_CHECK_INTERVAL_S
        while not self._pool.routable(request.model_name, str(version)):
            if time.monotonic() >= deadline_s:
                raise Unavailable(f"model '{request.model_name}' version {version} is deployed but no replica "
                                  f"became ready within {timeout_s:.0f} s: its worker failed to load or is still "
                                  f"loading (see the worker logs)")
            if time.monotonic() >= next_check_s:
                next_check_s = time.monotonic() + FAILURE_CHECK_INTERVAL_S
                failure = await self._deployment_failure(request.model_name, version, audited)
                if failure is not None:
                    raise Unavailable(f"model '{request.model_name}' version {version} failed to load: {failure}")
            await asyncio.sleep(0.1)
        return pb.RepositoryModelLoadResponse()

    async def _last_audit_sequence(self, model_name: str) -> int:
        entries = await self._audit(model_name, 0)
        return entries[-1].sequence if entries else 0

    async def _deployment_failure(self, model_name: str, version: int, after_sequence: int) -> str | None:
        """What the deployment controller reported of a worker of the version that exited."""
        for entry in await self._audit(model_name, after_sequence):
            if entry.action == "deployment.failed" and entry.version == version:
                details = json.loads(entry.details_json or "{}")
                return f"worker {details.get('worker', '?')} exited ({details.get('exit', '?')})"
        return None

    async def _audit(self, model_name: str, after_sequence: int):
        try:
            reply = await self._registry.ListAudit(registry_pb2.ListAuditRequest(
                model_name=model_name, after_sequence=after_sequence), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return []  # the timeout still bounds the wait
        return reply.entries

    async def unload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        version = await self._version(request.model_name, request.parameters, latest_if_unset=False)
        wanted = await self._deployments(request.model_name)
        versions = [version] if version else [v for (_, v), replicas in wanted.items() if replicas > 0]
        for number in versions:
            await self._set_deployment(request.model_name, number, 0, context, "RepositoryModelUnload")
        return pb.RepositoryModelUnloadResponse()

    async def _version(self, model_name: str, parameters, latest_if_unset: bool) -> int:
        """The `version` parameter (a number, or an alias, as int64 or string), checked against the
        registry; unset: the latest version (load) or 0 meaning every version (unload)."""
        if not model_name:
            raise InvalidArgument("model_name is empty")
        model = await self._catalog.lookup(model_name)
        parameter = parameters.get(VERSION_PARAMETER)
        if parameter is None:
            if not model.versions:
                raise NotFound(f"model '{model_name}' has no versions")
            return max(model.versions) if latest_if_unset else 0
        choice = parameter.WhichOneof("parameter_choice")
        if choice == "int64_param":
            reference = str(parameter.int64_param)
        elif choice == "string_param":
            reference = parameter.string_param
        else:
            raise InvalidArgument("the 'version' parameter must be an int64 or string")
        return await self._catalog.resolve(model_name, reference)

    async def _deployments(self, model_name: str) -> dict[tuple[str, int], int]:
        try:
            reply = await self._registry.ListDeployments(
                registry_pb2.ListDeploymentsRequest(model_name=model_name), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise RegistryRefused(error) from None
        return {(d.model_name, d.version): d.replicas for d in reply.deployments}

    async def _set_deployment(self, model_name: str, version: int, replicas: int, context, reason: str) -> None:
        credentials = tuple(
            (key, value) for key, value in (context.invocation_metadata() or ())
            if key in (AUTHORIZATION_HEADER, ADMIN_TOKEN_HEADER)
        )
        try:
            await self._registry.SetDeployment(registry_pb2.SetDeploymentRequest(
                deployment=registry_pb2.Deployment(model_name=model_name, version=version, replicas=replicas),
                reason=f"{reason} through the router"), metadata=credentials, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise RegistryRefused(error) from None


def _why_unavailable(replicas_wanted: int | None) -> str:
    if not replicas_wanted:
        return "not deployed (RepositoryModelLoad deploys it)"
    return f"deployed ({replicas_wanted} replica(s) wanted); no replica is ready yet"
