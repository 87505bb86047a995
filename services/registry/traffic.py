"""A model's traffic policy: which version serves a request that names none.

The record the store keeps and the checks a policy passes before it is stored. Checks that need
the database (every version named exists) are the store's; the rest is here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument

PERCENT_TOLERANCE = 1e-6
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class TrafficSplit:
    version: int
    percent: float


@dataclass(frozen=True, slots=True)
class AbRoute:
    value: str
    version: int


@dataclass(frozen=True, slots=True)
class RollbackPolicy:
    window_s: float = 0.0
    min_requests: int = 0
    max_error_rate_increase: float = 0.0
    max_latency_ratio: float = 0.0


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    model_name: str
    stable_version: int
    splits: tuple[TrafficSplit, ...] = ()  # empty: everything to stable_version
    ab_key: str = ""
    ab_routes: tuple[AbRoute, ...] = ()
    sticky_key: str = ""
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)
    # Set by the store: raised on every change.
    revision: int = 0
    updated_at_s: float = 0.0

    @property
    def versions(self) -> frozenset[int]:
        """Every version the policy can send a request to."""
        return frozenset(
            {self.stable_version, *(s.version for s in self.splits), *(r.version for r in self.ab_routes)}
        )

    def to_json_dict(self) -> dict:
        """What the store keeps (revision and time are columns of their own)."""
        body = dataclasses.asdict(self)
        for column in ("model_name", "revision", "updated_at_s"):
            del body[column]
        return body

    @classmethod
    def from_json_dict(cls, model_name: str, body: dict, revision: int, updated_at_s: float) -> TrafficPolicy:
        return cls(
            model_name=model_name,
            stable_version=body["stable_version"],
            splits=tuple(TrafficSplit(**split) for split in body["splits"]),
            ab_key=body["ab_key"],
            ab_routes=tuple(AbRoute(**route) for route in body["ab_routes"]),
            sticky_key=body["sticky_key"],
            rollback=RollbackPolicy(**body["rollback"]),
            revision=revision,
            updated_at_s=updated_at_s,
        )


def validate_policy(policy: TrafficPolicy) -> TrafficPolicy:
    """`policy` if it is well formed on its own; InvalidArgument naming what is wrong."""
    if type(policy.stable_version) is not int or policy.stable_version < 1:
        raise InvalidArgument("traffic policy needs a stable_version (the version a rollback returns to)")
    _check_splits(policy)
    _check_ab(policy)
    if policy.sticky_key and _METADATA_KEY.fullmatch(policy.sticky_key) is None:
        raise InvalidArgument(f"sticky_key {policy.sticky_key!r}: use a lowercase metadata key, e.g. x-user-id")
    _check_rollback(policy.rollback)
    return policy


def _check_splits(policy: TrafficPolicy) -> None:
    if not policy.splits:
        return
    seen: set[int] = set()
    for split in policy.splits:
        if type(split.version) is not int or split.version < 1:
            raise InvalidArgument(f"traffic split names version {split.version!r}: versions start at 1")
        if split.version in seen:
            raise InvalidArgument(f"traffic split names version {split.version} twice")
        seen.add(split.version)
        if not (math.isfinite(split.percent) and 0.0 <= split.percent <= 100.0):
            raise InvalidArgument(f"traffic split for version {split.version}: percent {split.percent} is not in [0, 100]")
    total = math.fsum(split.percent for split in policy.splits)
    if abs(total - 100.0) > PERCENT_TOLERANCE:
        raise InvalidArgument(f"traffic splits sum to {total:g} percent, not 100")
    if policy.stable_version not in seen:
        raise InvalidArgument(
            f"stable_version {policy.stable_version} is not among the split's versions {sorted(seen)}"
        )


def _check_ab(policy: TrafficPolicy) -> None:
    if bool(policy.ab_key) != bool(policy.ab_routes):
        raise InvalidArgument("A/B routing needs both ab_key and ab_routes")
    if policy.ab_key and _METADATA_KEY.fullmatch(policy.ab_key) is None:
        raise InvalidArgument(f"ab_key {policy.ab_key!r}: use a lowercase metadata key, e.g. x-experiment")
    values: set[str] = set()
    for route in policy.ab_routes:
        if not route.value or "\0" in route.value:
            raise InvalidArgument("every A/B route needs a non-empty value")
        if route.value in values:
            raise InvalidArgument(f"A/B value {route.value!r} is routed twice")
        values.add(route.value)
        if type(route.version) is not int or route.version < 1:
            raise InvalidArgument(f"A/B value {route.value!r} names version {route.version!r}")


def _check_rollback(rollback: RollbackPolicy) -> None:
    for name in ("window_s", "max_error_rate_increase", "max_latency_ratio"):
        value = getattr(rollback, name)
        if not (math.isfinite(value) and value >= 0.0):
            raise InvalidArgument(f"rollback.{name} must be a finite number >= 0, got {value}")
    if type(rollback.min_requests) is not int or rollback.min_requests < 0:
        raise InvalidArgument(f"rollback.min_requests must be >= 0, got {rollback.min_requests!r}")
