"""The Consul stand-in follows Consul's documented HTTP API: checked over real HTTP against a subprocess.

Each test names the documented behaviour it holds the stand-in to (developer.hashicorp.com/consul/
api-docs/agent/service, /agent/check, /health, /catalog, /kv, /session, /features/blocking, /acl).
TTLs are 1 s and the reaper knobs short, so the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support.consul_fixtures import FAST_TIMERS, ConsulStandin


class Consul:
    """A bare HTTP client: what Consul answers, status, headers and body, nothing interpreted."""

    def __init__(self, url: str, token: str | None = None):
        self.url, self.token = url, token

    def call(self, method: str, path: str, body=None, headers: dict | None = None, timeout_s: float = 15):
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if self.token:
            request.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                return reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def ok(self, method: str, path: str, body=None):
        status, headers, raw = self.call(method, path, body)
        assert status == 200, (status, raw)
        return json.loads(raw) if raw else None

    def get(self, path: str):
        status, headers, raw = self.call("GET", path)
        assert status == 200, (status, raw)
        return int(headers["X-Consul-Index"]), json.loads(raw)

    def register(self, name: str, service_id: str, **fields):
        self.ok("PUT", "/v1/agent/service/register", {"Name": name, "ID": service_id, "Port": 9000, **fields})

    def statuses(self, name: str) -> dict[str, str]:
        _, entries = self.get(f"/v1/health/service/{name}")
        return {e["Service"]["ID"]: [c["Status"] for c in e["Checks"] if c["ServiceID"]][0] for e in entries}


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    process = ConsulStandin(*FAST_TIMERS, log_path=tmp_path_factory.mktemp("consul") / "standin.log").start()
    yield process
    process.stop()


@pytest.fixture
def consul(standin) -> Consul:
    return Consul(standin.url)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s}s: {what}")


# ---- agent services and TTL checks ---------------------------------------------------------------


def test_ttl_check_starts_critical(consul):
    consul.register("ttl-start", "ttl-start-1", Check={"TTL": "10s"})
    assert consul.statuses("ttl-start") == {"ttl-start-1": "critical"}


def test_initial_status_given_is_used(consul):
    consul.register("ttl-initial", "ttl-initial-1", Check={"TTL": "10s", "Status": "passing"})
    assert consul.statuses("ttl-initial") == {"ttl-initial-1": "passing"}


def test_pass_makes_check_passing_with_note_as_output(consul):
    consul.register("ttl-pass", "ttl-pass-1", Check={"TTL": "10s"})
    consul.ok("PUT", "/v1/agent/check/pass/service:ttl-pass-1?note=engine%20stepping")
    _, [entry] = consul.get("/v1/health/service/ttl-pass")
    check = entry["Checks"][1]
    assert check["CheckID"] == "service:ttl-pass-1"
    assert (check["Status"], check["Output"]) == ("passing", "engine stepping")


def test_warn_and_fail_set_their_status(consul):
    consul.register("ttl-warn", "ttl-warn-1", Check={"TTL": "10s"})
    consul.ok("PUT", "/v1/agent/check/warn/service:ttl-warn-1")
    assert consul.statuses("ttl-warn") == {"ttl-warn-1": "warning"}
    consul.ok("PUT", "/v1/agent/check/fail/service:ttl-warn-1")
    assert consul.statuses("ttl-warn") == {"ttl-warn-1": "critical"}


def test_ttl_running_out_turns_check_critical(consul):
    consul.register("ttl-expiry", "ttl-expiry-1", Check={"TTL": "1s"})
    consul.ok("PUT", "/v1/agent/check/pass/service:ttl-expiry-1")
    time.sleep(0.7)
    assert consul.statuses("ttl-expiry") == {"ttl-expiry-1": "passing"}
    time.sleep(0.6)
    _, [entry] = consul.get("/v1/health/service/ttl-expiry")
    assert (entry["Checks"][1]["Status"], entry["Checks"][1]["Output"]) == ("critical", "TTL expired")


def test_each_pass_resets_the_ttl(consul):
    consul.register("ttl-reset", "ttl-reset-1", Check={"TTL": "1s"})
    for _ in range(4):  # 2.4 s in all, well past one TTL, never 1 s without a pass
        consul.ok("PUT", "/v1/agent/check/pass/service:ttl-reset-1")
        time.sleep(0.6)
    assert consul.statuses("ttl-reset") == {"ttl-reset-1": "passing"}


def test_deregister_critical_service_after_removes_the_service(consul):
    consul.register("reaped", "reaped-1", Check={"TTL": "10s", "DeregisterCriticalServiceAfter": "1s"})
    consul.register("reaped", "reaped-2", Check={"TTL": "10s", "DeregisterCriticalServiceAfter": "1s"})
    consul.ok("PUT", "/v1/agent/check/pass/service:reaped-2")
    time.sleep(0.5)
    assert set(consul.statuses("reaped")) == {"reaped-1", "reaped-2"}
    wait_for(lambda: set(consul.statuses("reaped")) == {"reaped-2"}, 2.0, "reaped-1 deregistered")
    assert "service:reaped-1" not in consul.ok("GET", "/v1/agent/checks")


def test_deregister_critical_after_is_clamped_to_consul_minimum(start_consul_standin):
    """Consul's floor is one minute: with the default knobs a 1 s setting does not reap after 1.5 s."""
    consul = Consul(start_consul_standin("--reap-interval", "100ms").url)
    consul.register("clamped", "clamped-1", Check={"TTL": "10s", "DeregisterCriticalServiceAfter": "1s"})
    time.sleep(1.5)
    assert consul.statuses("clamped") == {"clamped-1": "critical"}


def test_deregister_removes_service_and_its_checks(consul):
    consul.register("gone", "gone-1", Check={"TTL": "10s"})
    consul.ok("PUT", "/v1/agent/service/deregister/gone-1")
    assert consul.get("/v1/health/service/gone")[1] == []
    assert "service:gone-1" not in consul.ok("GET", "/v1/agent/checks")
    status, _, body = consul.call("PUT", "/v1/agent/service/deregister/gone-1")
    assert (status, body) == (404, b'Unknown service ID "gone-1"')


def test_several_checks_get_numbered_ids(consul):
    consul.register("multi", "multi-1", Checks=[{"TTL": "10s"}, {"TTL": "10s", "CheckID": "mine"}])
    _, [entry] = consul.get("/v1/health/service/multi")
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "mine", "service:multi-1:1"]


def test_one_check_in_checks_is_not_numbered(consul):
    consul.register("single", "single-1", Checks=[{"TTL": "10s"}])
    assert "service:single-1" in consul.ok("GET", "/v1/agent/checks")


def test_reregister_keeps_existing_check_status_even_over_a_given_status(consul):
    """Consul's agent restores a re-registered check's status from its snapshot (agent.go)."""
    consul.register("rereg", "rereg-1", Check={"TTL": "10s"})
    consul.ok("PUT", "/v1/agent/check/pass/service:rereg-1")
    consul.register("rereg", "rereg-1", Check={"TTL": "10s", "Status": "critical"}, Tags=["v2"])
    assert consul.statuses("rereg") == {"rereg-1": "passing"}


def test_identical_reregister_takes_no_new_index(consul):
    consul.register("same", "same-1", Check={"TTL": "10s"})
    index, _ = consul.get("/v1/health/service/same")
    consul.register("same", "same-1", Check={"TTL": "10s"})
    assert consul.get("/v1/health/service/same")[0] == index


def test_field_names_are_matched_ignoring_case_as_go_decodes_them(consul):
    """py-consul sends {"name": ..., "check": {"ttl": ...}}; Consul reads them as Name and TTL."""
    consul.ok("PUT", "/v1/agent/service/register", {
        "name": "lowercase", "id": "lowercase-1", "port": 9001, "tags": ["t"], "meta": {"Model": "m"},
        "check": {"ttl": "10s", "status": "passing", "deregister_critical_service_after": "1m"}})
    _, [entry] = consul.get("/v1/health/service/lowercase")
    service = entry["Service"]
    assert (service["ID"], service["Port"], service["Meta"]) == ("lowercase-1", 9001, {"Model": "m"})
    assert entry["Checks"][1]["Status"] == "passing"
    session_id = consul.ok("PUT", "/v1/session/create", {"ttl": "2s", "lockdelay": "1s", "behavior": "delete"})["ID"]
    [info] = consul.get(f"/v1/session/info/{session_id}")[1]
    assert (info["TTL"], info["LockDelay"], info["Behavior"]) == ("2s", 1_000_000_000, "delete")


def test_update_of_unknown_check_is_404(consul):
    status, _, body = consul.call("PUT", "/v1/agent/check/pass/service:nobody")
    assert (status, body) == (404, b'Unknown check ID "service:nobody"')


@pytest.mark.parametrize(
    "registration, message",
    [
        ({"Port": 1}, b"Missing service name"),
        ({"Name": "x", "Port": 70000}, b"Invalid service port"),
        ({"Name": "x", "Check": {"TTL": "ten"}}, b"Invalid TTL"),
        ({"Name": "x", "Check": {"TTL": "1s", "Status": "green"}}, b"Invalid initial check status"),
        ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s", "GRPCUseTLS": True}}, b"GRPCUseTLS"),
        ({"Name": "x", "Check": {"Args": ["/bin/true"], "Interval": "1s"}}, b"not supported"),
    ],
)
def test_bad_registration_is_a_400_naming_the_problem(consul, registration, message):
    status, _, body = consul.call("PUT", "/v1/agent/service/register", registration)
    assert status == 400 and message in body, body


# ---- health and catalog queries ------------------------------------------------------------------


def test_passing_keeps_only_instances_with_every_check_passing(consul):
    for n, verb in enumerate(("pass", "warn", "fail"), 1):
        consul.register("filtered", f"filtered-{n}", Check={"TTL": "10s"})
        consul.ok("PUT", f"/v1/agent/check/{verb}/service:filtered-{n}")
    _, entries = consul.get("/v1/health/service/filtered?passing")
    assert [e["Service"]["ID"] for e in entries] == ["filtered-1"]
    _, entries = consul.get("/v1/health/service/filtered?passing=false")
    assert len(entries) == 3


def test_tag_filter_needs_every_tag(consul):
    consul.register("tagged", "tagged-1", Tags=["a", "b"])
    consul.register("tagged", "tagged-2", Tags=["a"])
    _, entries = consul.get("/v1/health/service/tagged?tag=a&tag=b")
    assert [e["Service"]["ID"] for e in entries] == ["tagged-1"]
    _, entries = consul.get("/v1/catalog/service/tagged?tag=a")
    assert [e["ServiceID"] for e in entries] == ["tagged-1", "tagged-2"]


def test_catalog_lists_services_with_their_tags(consul):
    consul.register("listed", "listed-1", Tags=["x"], Address="10.0.0.7", Meta={"model": "m"})
    _, services = consul.get("/v1/catalog/services")
    assert services["listed"] == ["x"] and services["consul"] == []
    _, [entry] = consul.get("/v1/catalog/service/listed")
    assert (entry["ServiceAddress"], entry["ServicePort"], entry["ServiceMeta"], entry["Address"]) == (
        "10.0.0.7", 9000, {"model": "m"}, "127.0.0.1")


def test_filter_expressions_are_refused_not_ignored(consul):
    status, _, body = consul.call("GET", "/v1/health/service/x?filter=Service.Port%3D%3D1")
    assert status == 400 and b"filter" in body


# ---- blocking queries ----------------------------------------------------------------------------


def test_blocking_query_wakes_when_the_service_changes(consul):
    consul.register("watched", "watched-1", Check={"TTL": "10s"})
    index, _ = consul.get("/v1/health/service/watched")
    with futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(consul.get, f"/v1/health/service/watched?index={index}&wait=10s")
        time.sleep(0.3)
        assert not waiting.done()
        consul.ok("PUT", "/v1/agent/check/pass/service:watched-1")
        new_index, entries = waiting.result(timeout=5)
    assert time.monotonic() - started < 2
    assert new_index > index and entries[0]["Checks"][1]["Status"] == "passing"


def test_blocking_query_returns_after_wait_with_jitter_at_most_a_sixteenth(consul):
    consul.register("quiet", "quiet-1")
    index, _ = consul.get("/v1/health/service/quiet")
    started = time.monotonic()
    new_index, _ = consul.get(f"/v1/health/service/quiet?index={index}&wait=1s")
    elapsed_s = time.monotonic() - started
    assert new_index == index
    assert 1.0 <= elapsed_s < 1.0 + 1 / 16 + 0.3


def test_blocking_query_ignores_unrelated_services(consul):
    consul.register("calm", "calm-1")
    index, _ = consul.get("/v1/health/service/calm")
    with futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(consul.get, f"/v1/health/service/calm?index={index}&wait=1s")
        consul.register("noisy", "noisy-1")
        time.sleep(0.3)
        assert not waiting.done()
        assert waiting.result(timeout=5)[0] == index


def test_catalog_services_blocks_until_a_registration(consul):
    index, _ = consul.get("/v1/catalog/services")
    with futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(consul.get, f"/v1/catalog/services?index={index}&wait=10s")
        time.sleep(0.2)
        consul.register("newcomer", "newcomer-1")
        new_index, services = waiting.result(timeout=5)
    assert new_index > index and "newcomer" in services


def test_index_is_never_zero_and_only_moves_forward(consul):
    seen = []
    for n in range(3):
        seen.append(consul.get("/v1/catalog/services")[0])
        consul.register("monotonic", f"monotonic-{n}")
        seen.append(consul.get("/v1/health/service/monotonic")[0])
    assert min(seen) >= 1 and seen == sorted(seen)
    assert consul.get("/v1/health/service/never-registered")[0] >= 1


def test_bad_index_or_wait_is_a_400(consul):
    assert consul.call("GET", "/v1/catalog/services?index=abc")[0] == 400
    assert consul.call("GET", "/v1/catalog/services?index=1&wait=10")[0] == 400  # Go durations need a unit


def test_a_restart_starts_empty_with_a_lower_index(consul_standin):
    """A dev agent keeps nothing: clients re-register, and a blocking query's index goes backwards."""
    consul = Consul(consul_standin.url)
    for n in range(20):
        consul.register("restarted", f"restarted-{n}")
    old_index, _ = consul.get("/v1/health/service/restarted")
    consul_standin.restart(down_s=0.2)
    started = time.monotonic()
    new_index, entries = consul.get(f"/v1/health/service/restarted?index={old_index}&wait=1s")
    assert entries == [] and 1 <= new_index < old_index
    assert time.monotonic() - started >= 1.0  # it blocked: the client's index is ahead of the server's


# ---- gRPC checks ---------------------------------------------------------------------------------


def test_grpc_check_follows_the_health_service(consul):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("inference", health_pb2.HealthCheckResponse.SERVING)
        check = {"GRPC": f"127.0.0.1:{port}/inference", "Interval": "200ms", "Timeout": "1s"}
        consul.register("grpc-checked", "grpc-checked-1", Check=check)
        wait_for(lambda: consul.statuses("grpc-checked") == {"grpc-checked-1": "passing"}, 3, "passing")
        servicer.set("inference", health_pb2.HealthCheckResponse.NOT_SERVING)
        wait_for(lambda: consul.statuses("grpc-checked") == {"grpc-checked-1": "critical"}, 3, "critical")
    finally:
        consul.ok("PUT", "/v1/agent/service/deregister/grpc-checked-1")
        server.stop(0)


def test_tcp_and_http_checks_probe_for_real(consul, standin):
    closed_port = ConsulStandin().port  # a free port: nothing listens there
    checks = {
        "tcp-open": {"TCP": f"127.0.0.1:{standin.port}"},
        "http-ok": {"HTTP": f"{standin.url}/v1/status/leader"},
        "tcp-closed": {"TCP": f"127.0.0.1:{closed_port}", "Status": "passing"},
        "http-404": {"HTTP": f"{standin.url}/v1/nope", "Status": "passing"},
    }
    for service_id, check in checks.items():
        consul.register("probed", service_id, Check={**check, "Interval": "200ms", "Timeout": "1s"})
    expected = {"tcp-open": "passing", "http-ok": "passing", "tcp-closed": "critical", "http-404": "critical"}
    try:
        wait_for(lambda: consul.statuses("probed") == expected, 3, f"probes reach {expected}")
    finally:
        for service_id in checks:
            consul.ok("PUT", f"/v1/agent/service/deregister/{service_id}")


# ---- KV ------------------------------------------------------------------------------------------


def test_kv_put_and_get_with_base64_value_and_indexes(consul):
    assert consul.ok("PUT", "/v1/kv/app/config?flags=42", b"hello") is True
    index, [entry] = consul.get("/v1/kv/app/config")
    assert base64.b64decode(entry["Value"]) == b"hello"
    assert (entry["Flags"], entry["LockIndex"], entry["CreateIndex"]) == (42, 0, entry["ModifyIndex"])
    assert index == entry["ModifyIndex"] and "Session" not in entry
    consul.ok("PUT", "/v1/kv/app/config", b"again")
    _, [updated] = consul.get("/v1/kv/app/config")
    assert updated["CreateIndex"] == entry["CreateIndex"] and updated["ModifyIndex"] > entry["ModifyIndex"]


def test_kv_missing_key_is_404_with_an_index(consul):
    status, headers, _ = consul.call("GET", "/v1/kv/no/such/key")
    assert status == 404 and int(headers["X-Consul-Index"]) >= 1


def test_kv_raw_recurse_and_keys(consul):
    for key in ("tree/a", "tree/b/c", "tree/b/d"):
        consul.ok("PUT", f"/v1/kv/{key}", key.encode())
    assert consul.call("GET", "/v1/kv/tree/b/c?raw")[2] == b"tree/b/c"
    _, entries = consul.get("/v1/kv/tree/?recurse")
    assert [e["Key"] for e in entries] == ["tree/a", "tree/b/c", "tree/b/d"]
    assert consul.get("/v1/kv/tree/?keys&separator=/")[1] == ["tree/a", "tree/b/"]
    assert consul.ok("DELETE", "/v1/kv/tree/b?recurse") is True
    assert consul.get("/v1/kv/tree/?keys")[1] == ["tree/a"]


def test_kv_cas_zero_writes_only_if_absent(consul):
    assert consul.ok("PUT", "/v1/kv/cas/new?cas=0", b"first") is True
    assert consul.ok("PUT", "/v1/kv/cas/new?cas=0", b"second") is False
    assert consul.call("GET", "/v1/kv/cas/new?raw")[2] == b"first"


def test_kv_cas_index_must_match_modify_index(consul):
    consul.ok("PUT", "/v1/kv/cas/versioned", b"v1")
    _, [entry] = consul.get("/v1/kv/cas/versioned")
    assert consul.ok("PUT", f"/v1/kv/cas/versioned?cas={entry['ModifyIndex'] - 1}", b"stale") is False
    assert consul.ok("PUT", f"/v1/kv/cas/versioned?cas={entry['ModifyIndex']}", b"v2") is True
    assert consul.ok("DELETE", f"/v1/kv/cas/versioned?cas={entry['ModifyIndex']}") is False
    _, [entry] = consul.get("/v1/kv/cas/versioned")
    assert consul.ok("DELETE", f"/v1/kv/cas/versioned?cas={entry['ModifyIndex']}") is True
    assert consul.call("GET", "/v1/kv/cas/versioned")[0] == 404


def test_kv_blocking_read_wakes_on_write(consul):
    consul.ok("PUT", "/v1/kv/watch/me", b"1")
    index, _ = consul.get("/v1/kv/watch/me")
    with futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(consul.get, f"/v1/kv/watch/me?index={index}&wait=10s")
        time.sleep(0.2)
        assert not waiting.done()
        consul.ok("PUT", "/v1/kv/watch/me", b"2")
        new_index, [entry] = waiting.result(timeout=5)
    assert new_index > index and base64.b64decode(entry["Value"]) == b"2"


def test_kv_blocking_prefix_read_wakes_on_delete(consul):
    consul.ok("PUT", "/v1/kv/prefix-watch/x", b"1")
    index, _ = consul.get("/v1/kv/prefix-watch/?recurse")
    with futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(consul.call, "GET", f"/v1/kv/prefix-watch/?recurse&index={index}&wait=10s")
        time.sleep(0.2)
        consul.ok("DELETE", "/v1/kv/prefix-watch/x")
        status, headers, _ = waiting.result(timeout=5)
    assert status == 404 and int(headers["X-Consul-Index"]) > index


# ---- sessions and locks --------------------------------------------------------------------------


def new_session(consul, **fields) -> str:
    return consul.ok("PUT", "/v1/session/create", {"Name": "test", **fields})["ID"]


def test_session_defaults_follow_consul(consul):
    session_id = new_session(consul)
    [info] = consul.get(f"/v1/session/info/{session_id}")[1]
    assert (info["Behavior"], info["LockDelay"], info["TTL"], info["NodeChecks"]) == (
        "release", 15_000_000_000, "", ["serfHealth"])
    consul.ok("PUT", f"/v1/session/destroy/{session_id}")
    assert consul.get(f"/v1/session/info/{session_id}")[1] == []


def test_acquire_and_release_follow_the_holder(consul):
    first, second = new_session(consul, LockDelay="0s"), new_session(consul, LockDelay="0s")
    assert consul.ok("PUT", f"/v1/kv/locks/a?acquire={first}", b"leader-1") is True
    assert consul.ok("PUT", f"/v1/kv/locks/a?acquire={second}", b"leader-2") is False
    assert consul.ok("PUT", f"/v1/kv/locks/a?acquire={first}", b"leader-1b") is True  # the holder rewrites
    _, [entry] = consul.get("/v1/kv/locks/a")
    assert (entry["Session"], entry["LockIndex"], base64.b64decode(entry["Value"])) == (first, 1, b"leader-1b")
    assert consul.ok("PUT", f"/v1/kv/locks/a?release={second}") is False
    assert consul.ok("PUT", f"/v1/kv/locks/a?release={first}") is True
    assert consul.ok("PUT", f"/v1/kv/locks/a?acquire={second}", b"leader-2") is True  # no delay on release
    _, [entry] = consul.get("/v1/kv/locks/a")
    assert (entry["Session"], entry["LockIndex"]) == (second, 2)


def test_acquire_with_unknown_session_is_an_error(consul):
    status, _, body = consul.call("PUT", "/v1/kv/locks/b?acquire=00000000-0000-0000-0000-000000000000", b"")
    assert status == 500 and b"invalid session" in body


def test_session_past_its_ttl_releases_its_lock(consul):
    holder = new_session(consul, TTL="1s", LockDelay="0s")
    assert consul.ok("PUT", f"/v1/kv/locks/expiring?acquire={holder}", b"x") is True
    time.sleep(0.8)
    assert consul.get("/v1/kv/locks/expiring")[1][0]["Session"] == holder  # never before the TTL
    time.sleep(0.4)  # past the TTL but inside twice the TTL: Consul may still hold it
    wait_for(lambda: "Session" not in consul.get("/v1/kv/locks/expiring")[1][0], 1.5, "lock released")
    assert consul.get(f"/v1/session/info/{holder}")[1] == []
    status, _, _ = consul.call("PUT", f"/v1/session/renew/{holder}")
    assert status == 404


def test_renewing_keeps_a_session_alive(consul):
    holder = new_session(consul, TTL="1s")
    for _ in range(5):  # 2.5 s, past twice the TTL
        [info] = consul.ok("PUT", f"/v1/session/renew/{holder}")
        time.sleep(0.5)
    assert info["ID"] == holder and consul.get(f"/v1/session/info/{holder}")[1] != []


def test_lock_delay_blocks_reacquire_after_invalidation(consul):
    holder, waiter = new_session(consul, LockDelay="1s"), new_session(consul)
    assert consul.ok("PUT", f"/v1/kv/locks/delayed?acquire={holder}") is True
    consul.ok("PUT", f"/v1/session/destroy/{holder}")
    assert "Session" not in consul.get("/v1/kv/locks/delayed")[1][0]
    assert consul.ok("PUT", f"/v1/kv/locks/delayed?acquire={waiter}") is False
    time.sleep(1.1)
    assert consul.ok("PUT", f"/v1/kv/locks/delayed?acquire={waiter}") is True


def test_delete_behavior_removes_held_keys(consul):
    holder = new_session(consul, Behavior="delete", LockDelay="0s")
    consul.ok("PUT", f"/v1/kv/ephemeral/worker?acquire={holder}", b"here")
    consul.ok("PUT", f"/v1/session/destroy/{holder}")
    assert consul.call("GET", "/v1/kv/ephemeral/worker")[0] == 404


def test_session_bound_to_a_check_dies_when_it_turns_critical(consul):
    consul.register("session-bound", "session-bound-1", Check={"TTL": "10s", "Status": "passing"})
    holder = new_session(consul, ServiceChecks=[{"ID": "service:session-bound-1"}], LockDelay="0s")
    consul.ok("PUT", f"/v1/kv/locks/bound?acquire={holder}")
    consul.ok("PUT", "/v1/agent/check/fail/service:session-bound-1")
    assert consul.get(f"/v1/session/info/{holder}")[1] == []
    status, _, body = consul.call("PUT", "/v1/session/create", {"ServiceChecks": [{"ID": "service:session-bound-1"}]})
    assert status == 500 and b"critical" in body


@pytest.mark.parametrize(
    "fields, message",
    [({"TTL": "100ms"}, b"Invalid Session TTL"), ({"Behavior": "keep"}, b"Invalid Behavior"),
     ({"LockDelay": "soon"}, b"Invalid LockDelay")],
)
def test_bad_session_is_a_400(consul, fields, message):
    status, _, body = consul.call("PUT", "/v1/session/create", fields)
    assert status == 400 and message in body, body


# ---- status, agent, ACL --------------------------------------------------------------------------


def test_status_leader_and_agent_self(consul):
    assert consul.ok("GET", "/v1/status/leader") == "127.0.0.1:8300"
    config = consul.ok("GET", "/v1/agent/self")["Config"]
    assert (config["Datacenter"], config["NodeName"]) == ("dc1", "standin")


def test_acl_token_is_required_when_set(start_consul_standin):
    url = start_consul_standin("--acl-token", "s3cret").url
    anonymous, wrong, right = Consul(url), Consul(url, token="nope"), Consul(url, token="s3cret")
    status, _, body = anonymous.call("GET", "/v1/agent/self")
    assert status == 403 and body.startswith(b"Permission denied")
    status, _, body = wrong.call("GET", "/v1/kv/x")
    assert (status, body) == (403, b"ACL not found")
    assert right.call("GET", "/v1/agent/self")[0] == 200
    assert anonymous.call("GET", "/v1/agent/self", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert anonymous.call("GET", "/v1/agent/self?token=s3cret")[0] == 200
    assert anonymous.call("GET", "/v1/status/leader")[0] == 200  # status needs no token in Consul either


def test_unknown_path_and_wrong_method(consul):
    assert consul.call("GET", "/v1/agent/service/register")[0] == 405
    assert consul.call("POST", "/v1/kv/x", b"v")[0] == 405
    assert consul.call("GET", "/v1/nope")[0] == 404
