"""Which models, versions, aliases and traffic policies exist, from the registry, so the router can
resolve a version reference (a number or an alias), choose the version for a request that names
none (`traffic.py`), and tell NOT_FOUND (no such model, version or alias) from UNAVAILABLE (it
exists, but no replica is ready now).

The list is refreshed every second in the background (`run`), so a policy or alias change reaches
the router within about a second without a request having to miss first; a lookup that misses
refreshes at once, at most every `refresh_interval_s`, so a stream of requests for an unknown model
costs the registry one call per interval, not one each. A failed refresh keeps the last list: the
router goes on routing what it knew while the registry is away.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.telemetry import get_logger
from services.router.traffic import TrafficPolicy

log = get_logger(__name__)

# An alias never looks like a number, so a reference is unambiguous (docs/ARCHITECTURE.md).
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
BACKGROUND_REFRESH_S = 1.0


@dataclass(frozen=True, slots=True)
class CatalogModel:
    name: str
    task: str
    versions: tuple[int, ...]  # ascending
    aliases: Mapping[str, int] = field(default_factory=dict)
    policy: TrafficPolicy | None = None

    @classmethod
    def from_proto(cls, model: registry_pb2.Model) -> CatalogModel:
        return cls(
            name=model.name,
            task=model.task,
            versions=tuple(sorted(model.versions)),
            aliases={alias.name: alias.version for alias in model.aliases},
            policy=TrafficPolicy.from_proto(model.traffic_policy) if model.HasField("traffic_policy") else None,
        )

    def version_of(self, reference: str) -> int | None:
        """The version a reference (number or alias, already checked by parse_reference) names,
        if it exists."""
        if reference.isdigit():
            number = int(reference)
            return number if number in self.versions else None
        return self.aliases.get(reference)

    def describe_references(self) -> str:
        versions = ", ".join(map(str, self.versions)) or "none"
        aliases = ", ".join(f"{name} -> {version}" for name, version in sorted(self.aliases.items())) or "none"
        return f"versions: {versions}; aliases: {aliases}"


def parse_reference(reference: str) -> str:
    """The reference as given, if it is a version number or could be an alias; INVALID_ARGUMENT
    otherwise (so a typo with a space or a slash is not reported as a missing alias)."""
    if reference.isascii() and (reference.isdigit() or ALIAS_PATTERN.fullmatch(reference)):
        return reference
    raise InvalidArgument(
        f"model_version '{reference}' is neither a version number nor an alias "
        f"(letters, digits, '_', '.', '-', starting with a letter, at most 64)"
    )


class ModelCatalog:
    def __init__(self, channel: grpc.aio.Channel, refresh_interval_s: float = 1.0):
        self.registry = registry_pb2_grpc.ModelRegistryStub(channel)  # also what the repository RPCs call
        self._refresh_interval_s = refresh_interval_s
        self._models: dict[str, CatalogModel] = {}
        # (model, version) of the deployments that scale to zero (autoscaled with min 0): a request
        # finding no replica of one is held until one is ready (cold_start.py), not refused.
        self._scale_to_zero: frozenset[tuple[str, int]] = frozenset()
        self._refreshed_at = float("-inf")
        self.num_refreshes = 0

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed_at < self._refresh_interval_s:
            return
        try:
            response = await self.registry.ListModels(registry_pb2.ListModelsRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"the model registry is unreachable: {error.details()}") from None
        models = {m.name: CatalogModel.from_proto(m) for m in response.models}
        for name, model in models.items():
            models[name] = self._in_revision_order(self._models.get(name), model)
        self._models = models
        self._scale_to_zero = await self._deployments_at_zero_min()
        self._refreshed_at = now
        self.num_refreshes += 1

    async def _deployments_at_zero_min(self) -> frozenset[tuple[str, int]]:
        try:
            response = await self.registry.ListDeployments(registry_pb2.ListDeploymentsRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return self._scale_to_zero  # the models were listed a moment ago: keep what was known
        return frozenset((d.model_name, d.version) for d in response.deployments
                         if d.autoscale and d.min_replicas == 0)

    def scales_to_zero(self, model_name: str, version: int) -> bool:
        return (model_name, version) in self._scale_to_zero

    def scale_to_zero_versions(self, model_name: str) -> set[int]:
        return {version for name, version in self._scale_to_zero if name == model_name}

    @staticmethod
    def _in_revision_order(known: CatalogModel | None, listed: CatalogModel) -> CatalogModel:
        """Policies apply in revision order: a registry replica that has not seen the latest write
        yet must not take a router back to an older split."""
        if known is None or known.policy is None or listed.policy is None:
            return listed
        if listed.policy.revision < known.policy.revision:
            return CatalogModel(listed.name, listed.task, listed.versions, listed.aliases, known.policy)
        return listed

    async def run(self, interval_s: float = BACKGROUND_REFRESH_S) -> None:
        """Refresh every interval_s until cancelled; says once when the registry goes away and
        once when it is back."""
        reachable = True
        while True:
            try:
                await self.refresh(force=True)
                if not reachable:
                    log.info("router_catalog_reachable")
                reachable = True
            except Unavailable as error:
                if reachable:
                    log.warning("router_catalog_unavailable", error=error.message)
                reachable = False
            await asyncio.sleep(interval_s)

    def models(self) -> dict[str, list[int]]:
        return {name: list(model.versions) for name, model in self._models.items()}

    def get(self, model_name: str) -> CatalogModel | None:
        return self._models.get(model_name)

    def task(self, model_name: str) -> str | None:
        """"generation", "embedding", ... or None for a model not seen in the registry yet."""
        model = self._models.get(model_name)
        return model.task if model is not None else None

    async def lookup(self, model_name: str) -> CatalogModel:
        """The model, refreshing once on a miss; NOT_FOUND if the registry has no such model."""
        model = self._models.get(model_name)
        if model is None:
            await self.refresh()
            model = self._models.get(model_name)
        if model is None:
            raise NotFound(f"unknown model '{model_name}': it is not in the model registry")
        return model

    async def resolve(self, model_name: str, reference: str) -> int:
        """The version number a reference names: NOT_FOUND (naming what exists) for an unknown
        model, version or alias, INVALID_ARGUMENT for something that cannot be either."""
        reference = parse_reference(reference)
        model = await self.lookup(model_name)
        version = model.version_of(reference)
        if version is None:  # perhaps created in the last second
            await self.refresh()
            model = await self.lookup(model_name)
            version = model.version_of(reference)
        if version is None:
            kind = "version" if reference.isdigit() else "alias"
            raise NotFound(f"model '{model_name}' has no {kind} '{reference}' ({model.describe_references()})")
        return version

    async def check(self, model_name: str, model_version: str) -> None:
        """Raise NotFound unless the model (and version or alias, if given) exists in the registry."""
        if model_version:
            await self.resolve(model_name, model_version)
        else:
            await self.lookup(model_name)
