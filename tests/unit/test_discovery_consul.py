"""The Consul discovery client's rules that the stand-in cannot be made to break on purpose: an index
that goes backwards or comes back 0, an index that jumps on every read, 5xx answers and a vanished
agent. A scripted HTTP double answers GET /v1/health/service/<name> here; everything the real
stand-in can show (registration, TTL checks, outages) is in tests/e2e/test_consul_discovery.py.
Plus the Meta encoding, which is pure."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from protos.tensoryard.v1 import discovery_pb2
from services.common.consul_meta import (
    MAX_META_VALUE_BYTES,
    decode_meta_key,
    encode_meta,
    encode_meta_key,
    instance_from_entry,
    service_definition,
)
from services.common.discovery_backends import consul_base_url, read_consul_token
from services.common.discovery_consul import ConsulDiscovery, next_index


def entry(instance_id: str, port: int = 9000, model: str = "m", address: str = "127.0.0.1") -> dict:
    return {
        "Node": {"Node": "n1", "Address": "10.0.0.9"},
        "Service": {"ID": instance_id, "Service": "tensoryard-worker", "Address": address, "Port": port,
                    "Meta": {"model_name": model, "model_version": "1", "metrics_port": "9100"}},
        "Checks": [{"CheckID": f"service:{instance_id}", "Status": "passing"}],
    }


@dataclass
class Answer:
    entries: list | None = None  # None with status 200: the entries of the last answer that had some
    index: int = 1
    status: int = 200
    delay_s: float = 0.0


@dataclass
class ScriptedConsul:
    """Answers the health query from `script`, one Answer per request (the last one repeats), and
    records each request's query string and time. `stop` drops the connections of queries still
    blocked, as an agent that goes away does."""

    script: list[Answer]
    requests: list[tuple[float, dict]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/health/service/{name}", self._health)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.stopping.set()
        await self.runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        assert request.match_info["name"] == "tensoryard-worker"
        self.requests.append((time.monotonic(), dict(request.query)))
        position = min(len(self.requests) - 1, len(self.script) - 1)
        answer = self.script[position]
        # As Consul: a read without an index returns at once, a blocking one by its wait at the latest.
        delay_s = min(answer.delay_s, float(request.query.get("wait", "0s").removesuffix("s")))
        try:
            await asyncio.wait_for(self.stopping.wait(), delay_s)
            if request.transport is not None:  # stopped while blocking: the connection drops
                request.transport.abort()
            raise web.HTTPServiceUnavailable()
        except TimeoutError:
            pass
        if answer.status != 200:
            return web.Response(status=answer.status, text="No cluster leader")
        entries = next((a.entries for a in reversed(self.script[:position + 1]) if a.entries is not None), [])
        return web.json_response(entries, headers={"X-Consul-Index": str(answer.index)})

    def indexes_asked(self) -> list[str | None]:
        return [query.get("index") for _, query in self.requests]


async def collect(discovery: ConsulDiscovery, duration_s: float, model: str = "") -> list[list[str]]:
    """Every list the watch yields within duration_s, as sorted instance ids."""
    seen: list[list[str]] = []

    async def follow():
        async for instances in discovery.watch("worker", model):
            seen.append(sorted(i.instance_id for i in instances))

    task = asyncio.create_task(follow())
    await asyncio.sleep(duration_s)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await discovery.close()
    return seen


def run_watch(script: list[Answer], duration_s: float, model: str = "", **options) -> tuple[list, ScriptedConsul]:
    async def main():
        double = ScriptedConsul(script)
        url = await double.start()
        try:
            return await collect(ConsulDiscovery(url, **options), duration_s, model), double
        finally:
            await double.stop()

    return asyncio.run(main())


# -- blocking-query index rules -------------------------------------------------------------------


def test_next_index_follows_the_returned_index():
    assert next_index(0, 7) == 7
    assert next_index(7, 9) == 9
    assert next_index(9, 9) == 9


def test_next_index_resets_when_the_index_goes_backwards():
    assert next_index(100, 50) == 0


def test_next_index_is_never_zero():
    assert next_index(0, 0) == 1


def test_watch_reads_everything_again_when_the_index_goes_backwards():
    script = [Answer([entry("w1")], index=100), Answer([entry("w1")], index=50),
              Answer([entry("w1")], index=50), Answer([entry("w1")], index=50, delay_s=5)]
    _, double = run_watch(script, 0.6, min_interval_s=0.05)
    # plain read, block at 100, the answer went back to 50: plain read again, then block at 50.
    assert double.indexes_asked()[:4] == [None, "100", None, "50"]
    assert all(query.get("passing") == "true" for _, query in double.requests)


def test_watch_reconnects_with_a_plain_read():
    # A restarted agent has a lower index: blocking at the old one would hang for the whole wait.
    script = [Answer([entry("w1")], index=40), Answer(status=500), Answer([entry("w1")], index=3),
              Answer(index=3, delay_s=5)]
    _, double = run_watch(script, 0.6, min_interval_s=0.05)
    assert double.indexes_asked()[:4] == [None, "40", None, "3"]


def test_watch_blocks_at_index_one_when_consul_answers_zero():
    script = [Answer([entry("w1")], index=0), Answer([entry("w1")], index=0, delay_s=5)]
    _, double = run_watch(script, 0.4, min_interval_s=0.05)
    assert double.indexes_asked()[:2] == [None, "1"]
    assert len(double.requests) == 2  # index 1 blocks: no busy loop on a zero index


def test_watch_asks_consul_to_wait():
    _, double = run_watch([Answer([entry("w1")], index=5), Answer(index=5, delay_s=5)], 0.3, wait_s=12)
    assert double.requests[1][1]["wait"] == "12s"


def test_watch_rate_limits_an_index_that_moves_on_every_read():
    # Every answer comes at once with a new index (writes that do not touch this service's set).
    script = [Answer([entry("w1")], index=i) for i in range(1, 200)]
    seen, double = run_watch(script, 1.0, min_interval_s=0.1)
    assert len(double.requests) <= 12  # about one per min_interval_s, not hundreds
    starts = [t for t, _ in double.requests]
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.09
    assert seen == [["w1"]]  # the same set is yielded once


# -- errors: the last good set stands -------------------------------------------------------------


def test_watch_yields_nothing_while_consul_answers_errors():
    script = [Answer([entry("w1"), entry("w2", 9001)], index=10)] + [Answer(status=500)] * 50
    seen, double = run_watch(script, 1.2)
    assert seen == [["w1", "w2"]]  # no empty list: Consul failing is no reason to route nowhere
    assert len(double.requests) >= 4  # it kept trying


def test_watch_backs_off_between_failed_queries():
    script = [Answer([entry("w1")], index=10)] + [Answer(status=503)] * 50
    _, double = run_watch(script, 1.5, min_interval_s=0.0)
    starts = [t for t, _ in double.requests[1:]]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))  # growing
    assert len(double.requests) < 10


def test_watch_keeps_the_last_set_while_consul_is_gone_and_reconciles_after():
    async def main():
        double = ScriptedConsul([Answer([entry("w1"), entry("w2", 9001)], index=10),
                                 Answer(index=10, delay_s=30)])
        url = await double.start()
        discovery = ConsulDiscovery(url, min_interval_s=0.05, resync_grace_s=0.6)
        seen: list[tuple[float, list[str]]] = []

        async def follow():
            async for instances in discovery.watch("worker"):
                seen.append((time.monotonic(), sorted(i.instance_id for i in instances)))

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        await double.stop()  # the agent is gone: connections refused
        await asyncio.sleep(1.0)
        during_outage = list(seen)
        # Back on the same port with a fresh state: w2 has not registered again (yet).
        back = ScriptedConsul([Answer([entry("w1")], index=3), Answer([entry("w1")], index=3, delay_s=30)],
                              port=double.port)
        await back.start()
        back_at = time.monotonic()
        await asyncio.sleep(2.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await discovery.close()
        await back.stop()
        return during_outage, seen, back_at

    during_outage, seen, back_at = asyncio.run(main())
    assert [ids for _, ids in during_outage] == [["w1", "w2"]]
    # After the outage: w2 is kept through the grace (it may be re-registering), then dropped.
    assert seen[-1][1] == ["w1"]
    assert seen[-1][0] - back_at >= 0.5
    assert [ids for _, ids in seen] == [["w1", "w2"], ["w1"]]


def test_a_new_instance_after_an_outage_is_taken_at_once():
    async def main():
        double = ScriptedConsul([Answer([entry("w1")], index=10), Answer(status=500), Answer(status=500),
                                 Answer([entry("w1"), entry("w3", 9003)], index=12),
                                 Answer(index=12, delay_s=30)])
        url = await double.start()
        try:
            return await collect(ConsulDiscovery(url, min_interval_s=0.05, resync_grace_s=5), 1.0)
        finally:
            await double.stop()

    assert asyncio.run(main()) == [["w1"], ["w1", "w3"]]


def test_watch_filters_by_model_and_decodes_instances():
    script = [Answer([entry("a", 9000, model="m"), entry("b", 9001, model="other"),
                      entry("c", 9002, model="m", address="")], index=4), Answer(index=4, delay_s=5)]

    async def main():
        double = ScriptedConsul(script)
        url = await double.start()
        discovery = ConsulDiscovery(url)
        try:
            async for instances in discovery.watch("worker", "m"):
                return instances
        finally:
            await discovery.close()
            await double.stop()

    instances = {i.instance_id: i for i in asyncio.run(main())}
    assert sorted(instances) == ["a", "c"]
    assert instances["a"].address == "127.0.0.1:9000"
    assert instances["a"].service == "worker"
    assert instances["a"].model_version == "1"
    assert dict(instances["a"].metadata) == {"metrics_port": "9100"}
    assert instances["c"].address == "10.0.0.9:9002"  # no service address: the node's


# -- Meta encoding ---------------------------------------------------------------------------------


def worker_instance(**metadata: str) -> discovery_pb2.Instance:
    return discovery_pb2.Instance(instance_id="w1", service="worker", address="127.0.0.1:50051",
                                  model_name="all-MiniLM-L6-v2", model_version="3", metadata=metadata)


def round_trip(instance: discovery_pb2.Instance) -> discovery_pb2.Instance:
    definition = service_definition(instance, check={})
    consul_entry = {"Node": {"Address": "10.0.0.1"},
                    "Service": {"ID": definition["ID"], "Address": definition["Address"],
                                "Port": definition["Port"], "Meta": definition["Meta"]}}
    return instance_from_entry(consul_entry, "worker")


def test_plain_metadata_keys_stay_readable():
    meta = encode_meta(worker_instance(metrics_port="9100", platform="pytorch_libtorch", pid="42"))
    assert meta == {"model_name": "all-MiniLM-L6-v2", "model_version": "3", "metrics_port": "9100",
                    "platform": "pytorch_libtorch", "pid": "42"}


@pytest.mark.parametrize("key", ["user.name", "has space", "ünïcode", "consul-reserved", "model_name",
                                 "b64-looks-encoded"])
def test_keys_consul_refuses_are_encoded_and_come_back(key):
    encoded = encode_meta_key(key)
    assert encoded != key
    assert len(encoded) <= 128 and all(c.isalnum() and c.isascii() or c in "-_" for c in encoded)
    assert not encoded.startswith("consul-")
    assert decode_meta_key(encoded) == key
    instance = worker_instance(**{key: "v"})
    assert round_trip(instance) == instance


def test_an_instance_survives_the_trip_through_consul():
    instance = worker_instance(metrics_port="9100", **{"x.y": "1", "ok": ""})
    assert round_trip(instance) == instance


def test_a_value_over_512_bytes_is_refused_by_name():
    with pytest.raises(ValueError, match="'notes'.*at most 512"):
        encode_meta(worker_instance(notes="é" * (MAX_META_VALUE_BYTES // 2 + 1)))


def test_a_key_too_long_even_encoded_is_refused():
    with pytest.raises(ValueError, match="too long"):
        encode_meta(worker_instance(**{"k." * 60: "v"}))


def test_more_than_64_pairs_are_refused():
    with pytest.raises(ValueError, match="at most 64"):
        encode_meta(worker_instance(**{f"k{i}": "v" for i in range(63)}))


def test_service_definition_names_the_service_and_splits_the_address():
    definition = service_definition(worker_instance(), check={"TTL": "5s"})
    assert (definition["ID"], definition["Name"], definition["Address"], definition["Port"]) == (
        "w1", "tensoryard-worker", "127.0.0.1", 50051)
    v6 = discovery_pb2.Instance(instance_id="w2", service="router", address="[::1]:8001")
    assert service_definition(v6, check={})["Address"] == "::1"
    assert round_trip(v6).address == "[::1]:8001"


def test_a_bad_address_is_refused():
    with pytest.raises(ValueError, match="host:port"):
        service_definition(discovery_pb2.Instance(instance_id="w", service="worker", address="nohost"), check={})


# -- selection ---------------------------------------------------------------------------------


def test_discovery_urls():
    assert consul_base_url("consul://127.0.0.1:8500") == "http://127.0.0.1:8500"
    assert consul_base_url("consul+https://consul.example:8501") == "https://consul.example:8501"
    assert consul_base_url("127.0.0.1:7070") is None  # a registry: the embedded catalog
    for bad in ("consul://127.0.0.1", "http://127.0.0.1:8500", "consul://h:1/v1"):
        with pytest.raises(ValueError, match="discovery"):
            consul_base_url(bad)


def test_the_token_file_wins_and_an_empty_one_is_refused(tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    assert read_consul_token("from-env", tmp_path / "token") == "s3cret"
    assert read_consul_token("from-env") == "from-env"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_consul_token("", tmp_path / "empty")


def test_consul_environment_conventions():
    from services.cli import with_consul_conventions

    assert with_consul_conventions({"CONSUL_HTTP_TOKEN": "t"})["TENSORYARD_CONSUL_TOKEN"] == "t"
    assert with_consul_conventions({"CONSUL_HTTP_TOKEN_FILE": "/f"})["TENSORYARD_CONSUL_TOKEN_FILE"] == "/f"
    assert with_consul_conventions({"CONSUL_HTTP_TOKEN": "t", "TENSORYARD_CONSUL_TOKEN": "mine"})[
        "TENSORYARD_CONSUL_TOKEN"] == "mine"
