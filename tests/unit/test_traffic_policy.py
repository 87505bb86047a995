"""Which version serves a request that names none (services/router/traffic.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from protos.tensoryard.v1 import registry_pb2
from services.router.traffic import TrafficPolicy, choose_version, sticky_point

REPO_ROOT = Path(__file__).resolve().parents[2]
CANARY_90_10 = TrafficPolicy(stable_version=1, splits=((1, 90.0), (2, 10.0)))
BOTH_READY = {1, 2}


def choose(policy, ready=BOTH_READY, values=None, aliases=None, seed=0):
    return choose_version(policy, aliases or {}, ready, values or {}, random.Random(seed))


def test_weighted_split_gives_the_canary_its_share_within_tolerance():
    rng = random.Random(11)
    draws = [choose_version(CANARY_90_10, {}, BOTH_READY, {}, rng).version for _ in range(20_000)]
    assert abs(draws.count(2) / len(draws) - 0.10) < 0.01


def test_splits_that_leave_a_remainder_give_it_to_the_stable_version():
    policy = TrafficPolicy(stable_version=1, splits=((2, 25.0),))
    rng = random.Random(3)
    draws = [choose_version(policy, {}, BOTH_READY, {}, rng).version for _ in range(10_000)]
    assert abs(draws.count(2) / len(draws) - 0.25) < 0.02
    assert set(draws) == {1, 2}


def test_a_zero_percent_canary_never_serves():
    policy = TrafficPolicy(stable_version=1, splits=((1, 100.0), (2, 0.0)))
    rng = random.Random(5)
    assert {choose_version(policy, {}, BOTH_READY, {}, rng).version for _ in range(2_000)} == {1}


def test_sticky_key_always_gets_the_same_version():
    policy = TrafficPolicy(stable_version=1, splits=((1, 50.0), (2, 50.0)), sticky_key="x-user")
    for user in ("alice", "bob", "carol", "dave"):
        chosen = {choose(policy, values={"x-user": user}, seed=seed).version for seed in range(50)}
        assert len(chosen) == 1, user
        assert chosen.pop() == (1 if sticky_point(user) < 50 else 2)
        assert choose(policy, values={"x-user": user}).reason == "sticky"


def test_sticky_keys_split_by_the_weights():
    policy = TrafficPolicy(stable_version=1, splits=((1, 90.0), (2, 10.0)), sticky_key="x-user")
    versions = [choose(policy, values={"x-user": f"user-{i}"}).version for i in range(10_000)]
    assert abs(versions.count(2) / len(versions) - 0.10) < 0.015


def test_sticky_point_is_the_same_in_every_process():
    # Two routers must send one user to one version: not Python's per-process salted hash().
    code = "from services.router.traffic import sticky_point; print(repr(sticky_point('alice')))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {repr(sticky_point("alice"))}


def test_ab_route_wins_over_the_split():
    policy = TrafficPolicy(stable_version=1, splits=((1, 100.0),), ab_key="x-experiment",
                           ab_routes={"new-ranker": 2})
    choice = choose(policy, values={"x-experiment": "new-ranker"})
    assert (choice.version, choice.reason) == (2, "ab")


def test_ab_value_not_listed_follows_the_split():
    policy = TrafficPolicy(stable_version=1, splits=((1, 100.0),), ab_key="x-experiment",
                           ab_routes={"new-ranker": 2})
    choice = choose(policy, values={"x-experiment": "something-else"})
    assert (choice.version, choice.reason) == (1, "split")


def test_drawn_version_without_a_ready_replica_falls_back_to_stable():
    policy = TrafficPolicy(stable_version=1, splits=((2, 100.0),))
    choice = choose(policy, ready={1})
    assert (choice.version, choice.reason) == (1, "fallback")


def test_ab_version_without_a_ready_replica_falls_back_to_stable():
    policy = TrafficPolicy(stable_version=1, ab_key="x-experiment", ab_routes={"b": 3})
    choice = choose(policy, ready={1, 2}, values={"x-experiment": "b"})
    assert (choice.version, choice.reason) == (1, "fallback")


def test_stable_version_without_replicas_is_still_the_answer():
    # No other version takes the stable share: the request fails UNAVAILABLE for that version.
    policy = TrafficPolicy(stable_version=1, splits=((1, 100.0),))
    assert choose(policy, ready={2}).version == 1


def test_no_policy_goes_to_the_production_alias():
    choice = choose(None, ready={1, 2, 3}, aliases={"production": 2, "canary": 3})
    assert (choice.version, choice.reason) == (2, "production")


def test_no_policy_and_no_production_alias_goes_to_the_latest_ready_version():
    choice = choose(None, ready={1, 2}, aliases={"canary": 3})
    assert (choice.version, choice.reason) == (2, "latest")


def test_nothing_ready_and_nothing_named_gives_no_version():
    assert choose(None, ready=set()).version is None


def test_policy_from_the_registry_proto():
    proto = registry_pb2.TrafficPolicy(
        model_name="m", stable_version=1, revision=7, ab_key="x-exp", sticky_key="x-user",
        splits=[registry_pb2.TrafficSplit(version=1, percent=90), registry_pb2.TrafficSplit(version=2, percent=10)],
        ab_routes=[registry_pb2.AbRoute(value="b", version=2)],
    )
    policy = TrafficPolicy.from_proto(proto)
    assert policy.splits == ((1, 90.0), (2, 10.0))
    assert dict(policy.ab_routes) == {"b": 2}
    assert policy.request_keys == ("x-exp", "x-user")
    assert policy.revision == 7
