"""The local deployment controller's plan: desired replicas against running workers."""

from __future__ import annotations

from services.rollout.controller import plan


def test_starts_one_worker_per_missing_replica():
    actions = plan({("m", 1): 1, ("m", 2): 2}, {("m", 1): ["w1"]})
    assert actions.start == [("m", 2), ("m", 2)]
    assert actions.stop == []


def test_stops_the_newest_workers_first():
    actions = plan({("m", 1): 1}, {("m", 1): ["worker-m-0", "worker-m-v1-1", "worker-m-v1-2"]})
    assert actions.stop == ["worker-m-v1-2", "worker-m-v1-1"]
    assert actions.start == []


def test_zero_replicas_stops_every_worker_of_the_version():
    assert plan({("m", 2): 0}, {("m", 2): ["a", "b"]}).stop == ["b", "a"]


def test_a_version_without_a_deployment_wants_no_workers():
    assert plan({("m", 2): 1}, {("m", 1): ["w1"], ("m", 2): ["w2"]}).stop == ["w1"]


def test_matching_state_needs_nothing():
    assert plan({("m", 1): 1, ("e", 3): 2}, {("m", 1): ["a"], ("e", 3): ["b", "c"]}).empty
