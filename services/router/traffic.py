"""Which version of a model serves a request that names none: the first half of the routing seam.

The router chooses the version here, then the model's replica policy (`policies.py`: least_load,
kv_aware) chooses among that version's replicas only, so a canary's workers take exactly the share
the policy gives them and never "any replica" (docs/ARCHITECTURE.md, "Which version serves").

In order:
1. A/B: the request carries the policy's `ab_key` (metadata or request parameter) with a value the
   policy routes: that version.
2. The weighted split: a point in [0, 100) drawn from a hash of the `sticky_key` value when the
   request has one (the same key lands on the same version in every router, every time), else at
   random; the splits cover consecutive ranges and `stable_version` takes what they leave.
   A chosen version (A/B or split) without a ready replica falls back to `stable_version`.
3. No policy: the `production` alias; no alias either: the latest version with a ready replica,
   so a fleet that only ever ran one version needs no setup.

Pure: the catalog's view of the model, the versions with ready replicas, the request's values of
the policy's keys and an RNG in; a version out.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

PRODUCTION_ALIAS = "production"


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    stable_version: int
    # (version, percent) in the registry's order; the ranges they cover follow that order.
    splits: tuple[tuple[int, float], ...] = ()
    ab_key: str = ""
    ab_routes: Mapping[str, int] = field(default_factory=dict)
    sticky_key: str = ""
    revision: int = 0

    @classmethod
    def from_proto(cls, policy) -> TrafficPolicy:
        """From a registry_pb2.TrafficPolicy."""
        return cls(
            stable_version=policy.stable_version,
            splits=tuple((s.version, s.percent) for s in policy.splits),
            ab_key=policy.ab_key,
            ab_routes={route.value: route.version for route in policy.ab_routes},
            sticky_key=policy.sticky_key,
            revision=policy.revision,
        )

    @property
    def request_keys(self) -> tuple[str, ...]:
        """The metadata keys / request parameters whose values the choice reads."""
        return tuple(key for key in (self.ab_key, self.sticky_key) if key)


@dataclass(frozen=True, slots=True)
class VersionChoice:
    # None: nothing to route to (no policy, no production alias and no version with a ready replica).
    version: int | None
    # "ab", "split", "sticky", "fallback", "production" or "latest": why, for logs and tests.
    reason: str


def choose_version(policy: TrafficPolicy | None, aliases: Mapping[str, int], ready_versions: Collection[int],
                   request_values: Mapping[str, str], rng: random.Random) -> VersionChoice:
    """The version for a request that names none. `request_values` holds the request's values of
    the policy's keys (those it carries)."""
    if policy is None:
        if PRODUCTION_ALIAS in aliases:
            return VersionChoice(aliases[PRODUCTION_ALIAS], "production")
        return VersionChoice(max(ready_versions) if ready_versions else None, "latest")
    ab_value = request_values.get(policy.ab_key) if policy.ab_key else None
    if ab_value is not None and ab_value in policy.ab_routes:
        return _ready_or_stable(policy, policy.ab_routes[ab_value], "ab", ready_versions)
    sticky_value = request_values.get(policy.sticky_key) if policy.sticky_key else None
    if sticky_value is not None:
        return _ready_or_stable(policy, split_version(policy, sticky_point(sticky_value)), "sticky", ready_versions)
    return _ready_or_stable(policy, split_version(policy, rng.random() * 100.0), "split", ready_versions)


def split_version(policy: TrafficPolicy, point: float) -> int:
    """The version whose range holds `point` (in [0, 100))."""
    upper = 0.0
    for version, percent in policy.splits:
        upper += percent
        if point < upper:
            return version
    return policy.stable_version


def sticky_point(value: str) -> float:
    """A point in [0, 100) from the key's value: blake2b, so the same in every process (Python's
    hash() is salted per process)."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


def _ready_or_stable(policy: TrafficPolicy, version: int, reason: str, ready_versions: Collection[int]) -> VersionChoice:
    if version in ready_versions or version == policy.stable_version:
        return VersionChoice(version, reason)
    return VersionChoice(policy.stable_version, "fallback")
