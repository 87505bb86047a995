"""Aliases, traffic policies and deployments: what routes traffic to versions, mixed into
`store.ModelStore` (which provides `_db`, `_clock`, `_read_version`, `_resolve` and `_audit`).

Each write runs in one transaction with its audit entry, as everything in the store does; each
holds the model's lock (`conn.lock_model`) so that concurrent writers of one model serialize.
"""

from __future__ import annotations

from dataclasses import replace

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.registry import version_rows
from services.registry.database import Connection
from services.registry.records import (
    AliasRecord,
    DeploymentRecord,
    check_version_number,
    validate_alias_name,
    validate_model_name,
)
from services.registry.traffic import TrafficPolicy, validate_policy

MAX_REPLICAS = 1024


class RolloutState:
    # -- aliases --------------------------------------------------------------------------

    def set_alias(
        self, model_name: str, name: str, version: int, reason: str = "", actor: str = "local"
    ) -> AliasRecord:
        validate_model_name(model_name)
        validate_alias_name(name)
        check_version_number(version)
        record = AliasRecord(model_name, name, version, self._clock())

        def work(conn: Connection) -> AliasRecord:
            conn.lock_model(model_name)
            self._read_version(conn, model_name, version)
            previous = version_rows.alias_version(conn, model_name, name)
            version_rows.upsert_alias(conn, record)
            details = {"alias": name, "previous_version": previous, "reason": reason}
            self._audit(conn, actor, "alias.set", model_name, version, details)
            return record

        return self._db.run(work, write=True)

    def delete_alias(self, model_name: str, name: str, reason: str = "", actor: str = "local") -> None:
        validate_model_name(model_name)
        validate_alias_name(name)

        def work(conn: Connection) -> None:
            conn.lock_model(model_name)
            version = self._resolve(conn, model_name, name)
            conn.execute("DELETE FROM aliases WHERE model_name = ? AND name = ?", (model_name, name))
            self._audit(conn, actor, "alias.delete", model_name, version, {"alias": name, "reason": reason})

        self._db.run(work, write=True)

    def list_aliases(self, model_name: str) -> list[AliasRecord]:
        validate_model_name(model_name)

        def work(conn: Connection) -> list[AliasRecord]:
            version_rows.require_model(conn, model_name)
            return version_rows.aliases(conn, model_name)

        return self._db.run(work, write=False)

    # -- traffic policy -------------------------------------------------------------------

    def get_traffic_policy(self, model_name: str) -> TrafficPolicy:
        validate_model_name(model_name)

        def work(conn: Connection) -> TrafficPolicy:
            version_rows.require_model(conn, model_name)
            policy = version_rows.traffic_policy(conn, model_name)
            if policy is None:
                raise NotFound(f"model {model_name!r} has no traffic policy")
            return policy

        return self._db.run(work, write=False)

    def set_traffic_policy(
        self, policy: TrafficPolicy, expected_revision: int = 0, reason: str = "", actor: str = "local",
        audit_action: str = "traffic.set", audit_details: dict | None = None,
    ) -> TrafficPolicy:
        """Store `policy` at the next revision; with `expected_revision` > 0, only if the stored
        revision still equals it (FailedPrecondition otherwise: read it again). The audit entry
        (`audit_action`, e.g. "rollback", with `audit_details` added) is written in the same
        transaction: no rollback without its reason on record."""
        validate_model_name(policy.model_name)
        validate_policy(policy)
        if type(expected_revision) is not int or expected_revision < 0:
            raise InvalidArgument(f"expected_revision must be >= 0, got {expected_revision!r}")
        model_name = policy.model_name

        def work(conn: Connection) -> TrafficPolicy:
            version_rows.require_model(conn, model_name)
            conn.lock_model(model_name)
            current = version_rows.traffic_policy(conn, model_name)
            revision = current.revision if current else 0
            if expected_revision and expected_revision != revision:
                raise FailedPrecondition(
                    f"traffic policy of {model_name!r} is at revision {revision}, not "
                    f"{expected_revision}: read it again and retry"
                )
            existing = set(version_rows.version_numbers(conn, model_name))
            missing = sorted(policy.versions - existing)
            if missing:
                raise NotFound(f"traffic policy names versions {missing} that model {model_name!r} does not have")
            stored = replace(policy, revision=revision + 1, updated_at_s=self._clock())
            version_rows.upsert_traffic_policy(conn, stored)
            details = {**(audit_details or {}), "revision": stored.revision, "policy": stored.to_json_dict(),
                       "reason": reason}
            self._audit(conn, actor, audit_action, model_name, stored.stable_version, details)
            return stored

        return self._db.run(work, write=True)

    # -- deployments ----------------------------------------------------------------------

    def set_deployment(
        self, model_name: str, version: int, replicas: int, reason: str = "", actor: str = "local",
        min_replicas: int = 0, max_replicas: int = 0, autoscale: bool = False,
    ) -> DeploymentRecord:
        """The whole record: without `autoscale` the count is fixed (an operator's count turns the
        autoscaler off for this version); with it the autoscaler moves `replicas` within
        min_replicas..max_replicas."""
        validate_model_name(model_name)
        check_version_number(version)
        for name, value in (("replicas", replicas), ("min_replicas", min_replicas), ("max_replicas", max_replicas)):
            if type(value) is not int or not 0 <= value <= MAX_REPLICAS:
                raise InvalidArgument(f"{name} must be 0..{MAX_REPLICAS}, got {value!r}")
        if autoscale and not (min_replicas <= replicas <= max_replicas and max_replicas >= 1):
            raise InvalidArgument(f"an autoscaled deployment needs min_replicas <= replicas <= max_replicas and "
                                  f"max_replicas >= 1, got {min_replicas} <= {replicas} <= {max_replicas}")
        if not autoscale and (min_replicas or max_replicas):
            raise InvalidArgument("min_replicas and max_replicas are the autoscaler's bounds: set autoscale too")
        record = DeploymentRecord(model_name, version, replicas, self._clock(), min_replicas, max_replicas,
                                  bool(autoscale))

        def work(conn: Connection) -> DeploymentRecord:
            conn.lock_model(model_name)
            self._read_version(conn, model_name, version)
            version_rows.put_deployment(conn, record)
            details = {"replicas": replicas, "reason": reason}
            if autoscale:
                details.update(autoscale=True, min_replicas=min_replicas, max_replicas=max_replicas)
            self._audit(conn, actor, "deployment.set", model_name, version, details)
            return record

        return self._db.run(work, write=True)

    def scale_deployment(
        self, model_name: str, version: int, replicas: int, reason: str, actor: str = "autoscaler",
        fence: int = 1,
    ) -> DeploymentRecord | None:
        """The autoscaler's write: `replicas` of a deployment that is still autoscaled, within its
        bounds, in the same transaction that checks so (an operator who fixed the count or removed the
        deployment since the autoscaler read it wins). None when it is no longer autoscaled.
        FAILED_PRECONDITION when `fence` is below the highest fencing token an autoscaler wrote
        with: a deposed leader's (services/autoscale/leader.py)."""
        validate_model_name(model_name)
        check_version_number(version)

        def work(conn: Connection) -> DeploymentRecord | None:
            version_rows.check_fence(conn, actor, fence)
            conn.lock_model(model_name)
            current = version_rows.deployment(conn, model_name, version)
            if current is None or not current.autoscale:
                return None
            if not current.min_replicas <= replicas <= current.max_replicas:
                raise InvalidArgument(f"{replicas} replicas is outside {model_name} v{version}'s bounds "
                                      f"{current.min_replicas}..{current.max_replicas}")
            if replicas == current.replicas:
                return current
            record = replace(current, replicas=replicas, updated_at_s=self._clock())
            version_rows.put_deployment(conn, record)
            self._audit(conn, actor, "deployment.scale", model_name, version,
                        {"replicas": replicas, "previous_replicas": current.replicas, "reason": reason})
            return record

        return self._db.run(work, write=True)

    def list_deployments(self, model_name: str = "") -> list[DeploymentRecord]:
        if model_name:
            validate_model_name(model_name)

        def work(conn: Connection) -> list[DeploymentRecord]:
            if model_name:
                version_rows.require_model(conn, model_name)
            return version_rows.deployments(conn, model_name)

        return self._db.run(work, write=False)
