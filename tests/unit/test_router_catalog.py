"""The router's catalog (services/router/catalog.py) and its version choice (versions.py) against a
small ModelRegistry servicer on loopback: version references, aliases, traffic policies, the
background refresh and what is forwarded."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc
import pytest
from tritonclient.grpc import (
    service_pb2 as pb,  # the unit tests' Triton protos (see test_infer_checks)
)

from protos.tensoryard.v1 import embeddings_pb2, registry_pb2, registry_pb2_grpc
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.router.catalog import ModelCatalog
from services.router.policies import RouteRequest
from services.router.versions import VersionRouting

MODEL = "m"


class FakeRegistry(registry_pb2_grpc.ModelRegistryServicer):
    """ListModels from a dict the test edits; `down` answers UNAVAILABLE."""

    def __init__(self) -> None:
        self.models: dict[str, registry_pb2.Model] = {}
        self.num_calls = 0
        self.down = False

    async def ListModels(self, request, context):
        self.num_calls += 1
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "registry down")
        return registry_pb2.ListModelsResponse(models=list(self.models.values()))

    def put(self, name: str = MODEL, versions=(1, 2), aliases=None, policy=None) -> None:
        model = registry_pb2.Model(
            name=name, task="embedding", versions=list(versions),
            aliases=[registry_pb2.Alias(model_name=name, name=a, version=v) for a, v in (aliases or {}).items()],
        )
        if policy is not None:
            model.traffic_policy.CopyFrom(policy)
        self.models[name] = model


def split_policy(*splits: tuple[int, float], stable: int = 1, revision: int = 1, **fields) -> registry_pb2.TrafficPolicy:
    return registry_pb2.TrafficPolicy(
        model_name=MODEL, stable_version=stable, revision=revision,
        splits=[registry_pb2.TrafficSplit(version=v, percent=p) for v, p in splits], **fields,
    )


@dataclass
class Replica:
    model_name: str
    model_version: str


class FakePool:
    """What VersionRouting reads of the pool: the routable replicas of a model."""

    def __init__(self, *replicas: Replica):
        self.replicas = list(replicas)

    def routable(self, model_name: str = "", model_version: str = "") -> list[Replica]:
        return [r for r in self.replicas if r.model_name == model_name
                and (not model_version or r.model_version == model_version)]


def run_with_registry(test):
    """Run `test(registry, catalog)` with a FakeRegistry served on loopback."""

    async def main():
        registry = FakeRegistry()
        server = grpc.aio.server()
        registry_pb2_grpc.add_ModelRegistryServicer_to_server(registry, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            return await test(registry, ModelCatalog(channel, refresh_interval_s=0.2))
        finally:
            await channel.close()
            await server.stop(0)

    return asyncio.run(main())


# -- references ------------------------------------------------------------------------------------


def test_number_and_alias_resolve_to_the_version():
    async def test(registry, catalog):
        registry.put(versions=(1, 2, 3), aliases={"production": 2, "canary": 3})
        return [await catalog.resolve(MODEL, ref) for ref in ("1", "production", "canary")]

    assert run_with_registry(test) == [1, 2, 3]


def test_unknown_alias_is_not_found_naming_the_aliases_and_versions():
    async def test(registry, catalog):
        registry.put(versions=(1, 2), aliases={"production": 1})
        with pytest.raises(NotFound) as error:
            await catalog.resolve(MODEL, "staging")
        return error.value.message

    message = run_with_registry(test)
    assert "no alias 'staging'" in message
    assert "versions: 1, 2" in message and "production -> 1" in message


def test_unknown_version_is_not_found():
    async def test(registry, catalog):
        registry.put(versions=(1, 2))
        with pytest.raises(NotFound, match="no version '7'"):
            await catalog.resolve(MODEL, "7")

    run_with_registry(test)


@pytest.mark.parametrize("reference", ["1.5", "v 1", "../x", "-x", "_x", "a" * 65, "²", "prod/uction"])
def test_a_reference_that_is_neither_number_nor_alias_is_invalid(reference):
    async def test(registry, catalog):
        registry.put()
        with pytest.raises(InvalidArgument, match="neither a version number nor an alias"):
            await catalog.resolve(MODEL, reference)

    run_with_registry(test)


def test_unknown_model_is_not_found():
    async def test(registry, catalog):
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            await catalog.resolve("nope", "1")

    run_with_registry(test)


def test_an_alias_created_a_moment_ago_is_found_at_once_on_a_miss():
    async def test(registry, catalog):
        registry.put(versions=(1, 2))
        await catalog.refresh(force=True)
        registry.put(versions=(1, 2), aliases={"canary": 2})
        await asyncio.sleep(0.25)  # past the miss interval
        return await catalog.resolve(MODEL, "canary")

    assert run_with_registry(test) == 2


def test_misses_refresh_at_most_once_per_interval():
    async def test(registry, catalog):
        await catalog.refresh(force=True)
        before = registry.num_calls
        for _ in range(50):
            with pytest.raises(NotFound):
                await catalog.lookup("nope")
        return registry.num_calls - before

    assert run_with_registry(test) <= 1


# -- background refresh ----------------------------------------------------------------------------


def test_background_refresh_applies_a_policy_change_within_a_second():
    async def test(registry, catalog):
        registry.put(policy=split_policy((1, 100.0)))
        refresher = asyncio.create_task(catalog.run())
        try:
            await asyncio.sleep(0.1)
            assert catalog.get(MODEL).policy.splits == ((1, 100.0),)
            registry.put(policy=split_policy((1, 90.0), (2, 10.0), revision=2))
            changed_at = time.monotonic()
            while catalog.get(MODEL).policy.revision != 2:
                assert time.monotonic() - changed_at < 1.5, "the policy change did not arrive"
                await asyncio.sleep(0.02)
            return catalog.get(MODEL).policy.splits
        finally:
            refresher.cancel()

    assert run_with_registry(test) == ((1, 90.0), (2, 10.0))


def test_an_older_policy_revision_does_not_replace_a_newer_one():
    async def test(registry, catalog):
        registry.put(policy=split_policy((1, 50.0), (2, 50.0), revision=5))
        await catalog.refresh(force=True)
        registry.put(policy=split_policy((1, 100.0), revision=4))  # a registry replica behind
        await catalog.refresh(force=True)
        return catalog.get(MODEL).policy.revision

    assert run_with_registry(test) == 5


def test_registry_away_keeps_the_last_list():
    async def test(registry, catalog):
        registry.put(aliases={"production": 1})
        await catalog.refresh(force=True)
        registry.down = True
        with pytest.raises(Unavailable):
            await catalog.refresh(force=True)
        return await catalog.resolve(MODEL, "production")

    assert run_with_registry(test) == 1


# -- version choice and what is forwarded ---------------------------------------------------------


def settle(registry_setup, pool: FakePool, version: str = "", request=None, metadata=(), seed: int = 0):
    """(the route's version, the forwarded bytes, the request bytes given) after VersionRouting."""

    async def test(registry, catalog):
        registry_setup(registry)
        routing = VersionRouting(catalog, pool, random.Random(seed))
        message = request if request is not None else embeddings_pb2.EmbedRequest(model_name=MODEL, texts=["a"])
        message.model_version = version
        request_bytes = message.SerializeToString()
        route = RouteRequest(MODEL, version)
        forwarded = await routing.settle(route, request_bytes, metadata, request)
        return route.model_version, forwarded, request_bytes

    return run_with_registry(test)


BOTH = FakePool(Replica(MODEL, "1"), Replica(MODEL, "2"))


def test_a_numeric_version_is_forwarded_as_the_same_bytes():
    version, forwarded, sent = settle(lambda r: r.put(), BOTH, "2")
    assert version == "2"
    assert forwarded is sent  # zero-copy: not even re-encoded


def test_an_alias_is_forwarded_as_its_number():
    version, forwarded, _ = settle(lambda r: r.put(aliases={"canary": 2}), BOTH, "canary")
    assert version == "2"
    assert embeddings_pb2.EmbedRequest.FromString(forwarded).model_version == "2"
    assert embeddings_pb2.EmbedRequest.FromString(forwarded).texts == ["a"]


def test_no_version_follows_the_policy_and_forwards_the_bytes_unchanged():
    policy = split_policy((1, 0.0), (2, 100.0))
    version, forwarded, sent = settle(lambda r: r.put(policy=policy), BOTH)
    assert version == "2"
    assert forwarded is sent


def test_no_version_and_no_policy_goes_to_production():
    version, _, _ = settle(lambda r: r.put(aliases={"production": 1}), BOTH)
    assert version == "1"


def test_no_version_no_policy_no_alias_goes_to_the_latest_version_with_replicas():
    pool = FakePool(Replica(MODEL, "1"), Replica(MODEL, "2"))
    version, _, _ = settle(lambda r: r.put(versions=(1, 2, 3)), pool)
    assert version == "2"


def test_ab_key_in_metadata_routes_its_version():
    policy = split_policy((1, 100.0), ab_key="x-experiment", ab_routes=[registry_pb2.AbRoute(value="b", version=2)])
    version, _, _ = settle(lambda r: r.put(policy=policy), BOTH, metadata=(("x-experiment", "b"),))
    assert version == "2"


def test_ab_key_as_a_request_parameter_routes_its_version_and_is_not_forwarded():
    policy = split_policy((1, 100.0), ab_key="experiment", ab_routes=[registry_pb2.AbRoute(value="b", version=2)])
    request = pb.ModelInferRequest(model_name=MODEL, parameters={
        "experiment": pb.InferParameter(string_param="b"), "temperature": pb.InferParameter(string_param="0.5"),
    })
    version, forwarded, _ = settle(lambda r: r.put(policy=policy), BOTH, request=request)
    assert version == "2"
    assert set(pb.ModelInferRequest.FromString(forwarded).parameters) == {"temperature"}


def test_sticky_key_gets_the_same_version_on_every_request():
    policy = split_policy((1, 50.0), (2, 50.0), sticky_key="x-user")
    for user in ("alice", "bob", "carol"):
        versions = {settle(lambda r: r.put(policy=policy), BOTH, metadata=(("x-user", user),), seed=seed)[0]
                    for seed in range(5)}
        assert len(versions) == 1, user


def test_a_drawn_version_without_replicas_falls_back_to_stable():
    policy = split_policy((2, 100.0), stable=1)
    version, _, _ = settle(lambda r: r.put(policy=policy), FakePool(Replica(MODEL, "1")))
    assert version == "1"


def test_nothing_ready_and_nothing_named_is_unavailable():
    with pytest.raises(Unavailable, match="no ready replica"):
        settle(lambda r: r.put(), FakePool())


def test_replicas_of_a_model_the_registry_does_not_list_keep_serving_by_number():
    # The registry was away when the router started: what runs keeps being served.
    def away(registry):
        registry.down = True

    pool = FakePool(Replica(MODEL, "3"))
    assert settle(away, pool)[0] == "3"
    assert settle(away, pool, "3")[0] == "3"
    with pytest.raises(Unavailable):
        settle(away, pool, "production")
