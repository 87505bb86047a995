"""deploy/consul: the agent sample parses as HCL and turns ACLs (deny by default) and TLS on; the
ACL policies parse and grant each role what it writes."""

from __future__ import annotations

import hcl2
from hcl2 import SerializationOptions

from tests.conftest import REPO_ROOT

CONSUL_DIR = REPO_ROOT / "deploy" / "consul"
PLAIN = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def load(path):
    with open(path) as file:
        return hcl2.load(file, serialization_options=PLAIN)


def test_the_agent_denies_by_default_and_verifies_tls_both_ways():
    agent = load(CONSUL_DIR / "consul.hcl")
    (acl,) = agent["acl"]
    assert (acl["enabled"], acl["default_policy"]) == (True, "deny")
    (tls,) = agent["tls"]
    (defaults,) = tls["defaults"]
    assert defaults["verify_incoming"] is True and defaults["verify_outgoing"] is True
    assert tls["internal_rpc"][0]["verify_server_hostname"] is True
    # Plain HTTP only on loopback; HTTPS for the network.
    assert agent["addresses"][0]["http"] == "127.0.0.1"
    assert agent["ports"][0]["https"] == 8501


def rules(name: str) -> dict[tuple[str, str], str]:
    policy = load(CONSUL_DIR / "policies" / f"{name}.hcl")
    return {(kind, label): body["policy"] for kind, entries in policy.items()
            for entry in entries for label, body in entry.items()}


def test_each_role_may_write_only_its_own_service():
    for role in ("tensoryard-worker", "tensoryard-router", "tensoryard-registry"):
        granted = rules(role)
        assert granted[("service", role)] == "write"
        assert granted[("service_prefix", "")] == "read"
    assert rules("prometheus") == {("service_prefix", ""): "read", ("node_prefix", ""): "read"}


def test_only_the_registry_writes_the_scaling_signals_and_holds_sessions():
    assert rules("tensoryard-registry")[("key_prefix", "tensoryard/")] == "write"
    assert rules("tensoryard-registry")[("session_prefix", "")] == "write"
    assert rules("tensoryard-worker")[("key_prefix", "tensoryard/deployments/")] == "read"
    assert ("session_prefix", "") not in rules("tensoryard-router")


def test_routers_write_held_requests_but_cannot_touch_the_leader_lock():
    router = rules("tensoryard-router")
    assert router[("key_prefix", "tensoryard/deployments/")] == "write"  # .../held/<router id>
    assert router[("key_prefix", "tensoryard/")] == "read"  # tensoryard/autoscaler/leader
    assert ("session_prefix", "") not in router
