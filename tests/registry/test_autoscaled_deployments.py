"""Autoscaled deployments in the store (bounds, scale-to-zero rows, the autoscaler's fenced write),
the same on SQLite + local disk and on PostgreSQL + S3."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from tests.registry.test_store_backends import publish


@pytest.fixture
def deployed(store):
    store.create_model("m", "tensor")
    publish(store)
    return store


def test_an_autoscaled_deployment_keeps_its_bounds_and_its_row_at_zero(deployed):
    deployed.set_deployment("m", 1, 1, min_replicas=0, max_replicas=3, autoscale=True)
    (record,) = deployed.list_deployments("m")
    assert (record.replicas, record.min_replicas, record.max_replicas, record.autoscale) == (1, 0, 3, True)

    assert deployed.scale_deployment("m", 1, 0, "idle").replicas == 0
    (record,) = deployed.list_deployments("m")
    assert (record.replicas, record.autoscale) == (0, True)  # scaled to zero, still autoscaled
    actions = [(e.action, e.actor, e.details.get("replicas")) for e in deployed.list_audit()]
    assert actions[-1] == ("deployment.scale", "autoscaler", 0)


def test_an_operators_fixed_count_turns_autoscaling_off_and_fences_the_autoscaler(deployed):
    deployed.set_deployment("m", 1, 2, min_replicas=1, max_replicas=3, autoscale=True)
    deployed.set_deployment("m", 1, 2)  # a fixed count, as RepositoryModelLoad or promote write it
    assert deployed.scale_deployment("m", 1, 3, "load") is None
    (record,) = deployed.list_deployments("m")
    assert (record.replicas, record.autoscale, record.max_replicas) == (2, False, 0)
    deployed.set_deployment("m", 1, 0)  # undeploy: the row goes
    assert deployed.list_deployments("m") == []
    assert deployed.scale_deployment("m", 1, 1, "load") is None


def test_bad_bounds_are_refused_naming_them(deployed):
    with pytest.raises(InvalidArgument, match="min_replicas <= replicas <= max_replicas"):
        deployed.set_deployment("m", 1, 4, min_replicas=1, max_replicas=3, autoscale=True)
    with pytest.raises(InvalidArgument, match="set autoscale too"):
        deployed.set_deployment("m", 1, 1, min_replicas=1, max_replicas=3)
    deployed.set_deployment("m", 1, 1, min_replicas=1, max_replicas=3, autoscale=True)
    with pytest.raises(InvalidArgument, match="outside"):
        deployed.scale_deployment("m", 1, 4, "load")


def test_a_deposed_leaders_write_with_an_older_fencing_token_is_refused_and_changes_nothing(deployed):
    deployed.set_deployment("m", 1, 1, min_replicas=0, max_replicas=3, autoscale=True)
    assert deployed.scale_deployment("m", 1, 2, "load", fence=7).replicas == 2  # the new leader
    with pytest.raises(FailedPrecondition, match="fencing token 6 is below"):
        deployed.scale_deployment("m", 1, 0, "idle", fence=6)  # the old one, waking from a pause
    (record,) = deployed.list_deployments("m")
    assert record.replicas == 2
    assert [e.details.get("replicas") for e in deployed.list_audit() if e.action == "deployment.scale"] == [2]
    assert deployed.scale_deployment("m", 1, 3, "load", fence=7).replicas == 3  # the same leader again
    assert deployed.scale_deployment("m", 1, 1, "load", fence=9).replicas == 1  # a later one
