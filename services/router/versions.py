"""Each request's version, settled before a replica is picked: version first, replica second.

The version a request names (a number, or an alias resolved from the catalog), else the one the
model's traffic policy chooses (`traffic.py`). The servicer writes it into the request's
`RouteRequest`, so the pool picks only among that version's replicas — retries and migrations
included, since they route by the same `RouteRequest`.

What is forwarded stays the caller's bytes, except:
- a request that named an alias gets the number appended (workers know only their number; a
  protobuf message followed by another is their merge, and every routed request message — ModelInfer,
  ModelMetadata, ModelConfig, Embed, Generate — has its version in field 2);
- a ModelInfer request that carried the policy's keys as parameters is re-encoded without them:
  they are the router's, and an LLM worker refuses parameters it does not know.

Kept apart from servicer.py so that it can be tested without the `inference` protos (a test process
may load them once, and the unit tests load tritonclient's).
"""

from __future__ import annotations

import random

from services.common.errors import NotFound, Unavailable
from services.router import metrics
from services.router.catalog import CatalogModel, ModelCatalog
from services.router.policies import RouteRequest
from services.router.relay import no_replica
from services.router.traffic import choose_version


class VersionRouting:
    def __init__(self, catalog: ModelCatalog, pool, rng: random.Random | None = None, hold=None):
        self._catalog = catalog
        self._hold = hold  # cold_start.ColdStartHold: the version to wait for when none is ready
        self._pool = pool  # services.router.pool.BackendPool: routable(model_name, model_version)
        self._rng = rng or random.Random()  # the weighted split's draws

    async def settle(self, route: RouteRequest, request_bytes: bytes, metadata=(), request=None) -> bytes:
        """Set route.model_version to the number of the version that serves the request; returns
        the bytes to forward. NOT_FOUND for an unknown model, version or alias, INVALID_ARGUMENT
        for a reference that cannot be one, UNAVAILABLE when nothing can serve."""
        reference = route.model_version
        model = await self._model(route.model_name, reference)
        keys = model.policy.request_keys if model is not None and model.policy is not None else ()
        parameters = getattr(request, "parameters", None)
        values = request_values(keys, metadata, parameters)
        if parameters and any(key in parameters for key in keys):
            for key in keys:
                if key in parameters:
                    del parameters[key]
            request_bytes = request.SerializeToString()
        if reference:
            if model is None or (is_number(reference) and reference[0] != "0" and int(reference) in model.versions):
                return request_bytes  # the common case: a number the workers know as it is
            route.model_version = str(await self._catalog.resolve(route.model_name, reference))
            return request_bytes + version_field(route.model_version)
        replicas = self._pool.routable(route.model_name)
        ready_versions = {int(b.model_version) for b in replicas if is_number(b.model_version)}
        if model is None:
            version = max(ready_versions, default=None)
        else:
            version = choose_version(model.policy, model.aliases, ready_versions, values, self._rng).version
        if version is None and self._hold is not None:
            version = self._hold.version_to_wait_for(model, values)
        if version is None:
            metrics.REJECTED.labels(route.model_name, "no_replica").inc()
            raise no_replica(route)
        route.model_version = str(version)
        return request_bytes

    async def resolve(self, model_name: str, reference: str) -> str:
        """A version reference as the number the workers know ("" stays "": any version)."""
        if not reference or is_number(reference):
            return reference
        return str(await self._catalog.resolve(model_name, reference))

    async def _model(self, model_name: str, reference: str) -> CatalogModel | None:
        """The model as the registry lists it; None when the registry does not list it but
        replicas of it run (the registry is away, or the model was registered a moment ago): those
        keep serving by the version numbers they report, as before aliases and policies."""
        model = self._catalog.get(model_name)
        if model is not None:
            return model
        try:
            return await self._catalog.lookup(model_name)
        except (NotFound, Unavailable):
            if reference and not is_number(reference):
                raise  # an alias needs the registry
            if self._pool.routable(model_name):
                return None
            raise


def is_number(reference: str) -> bool:
    return reference.isascii() and reference.isdigit()


def version_field(version: str) -> bytes:
    """Field 2 (length-delimited) = version, to append to a routed request message."""
    encoded = version.encode()
    return b"\x12" + bytes((len(encoded),)) + encoded  # a version number is far below 128 bytes


def generate_response_version(version: str) -> bytes:
    """GenerateResponse.model_version (field 7), to append to each response a worker sends."""
    encoded = version.encode()
    return b"\x3a" + bytes((len(encoded),)) + encoded


def request_values(keys: tuple[str, ...], metadata, parameters) -> dict[str, str]:
    """The request's values of these keys, from its metadata or its request parameters (any type,
    as text; a parameter wins over the same key in metadata)."""
    values: dict[str, str] = {}
    if not keys:
        return values
    for key, value in metadata or ():
        if key in keys:
            values[key] = value if isinstance(value, str) else value.decode("utf-8", "replace")
    for key in keys:
        if parameters and key in parameters:
            parameter = parameters[key]
            choice = parameter.WhichOneof("parameter_choice")
            if choice is not None:
                value = getattr(parameter, choice)
                values[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return values
