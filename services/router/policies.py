"""Routing policies: which replica of a model takes a request.

The seam: a policy gets the request (model, version, tenant, session key, and the block hashes of
its prompt when it asked for them) and the replicas that may take it — routable ones, of the
version the request resolved to — and returns one. Traffic splits between versions (canary, A/B)
choose the version before this and plug in here; discovery decides who the replicas are.

- `round_robin`: in turn.
- `least_load`: power of two choices on the replica's request count (reported running + waiting,
  plus what this router sent since the report): two replicas at random, the less loaded wins —
  nearly as good as the global minimum and it does not herd a burst onto one replica.
- `kv_aware`: cost = overlap_weight * (prompt blocks the replica does not hold) + the replica's
  active blocks (its running sequences' contexts, each in full, plus prompts queued and routed since
  its report: the decode work there); lowest wins, ties at random, or drawn
  by a softmax over the costs when `temperature` > 0. A **load guard** keeps a hot prefix from piling
  everything onto the replica that holds it: load is seat occupancy (requests on the replica over its
  `max_num_seqs`), and when the most loaded candidate is more than `abs_occupancy` above the least
  loaded and more than `ratio` times its load, the least loaded wins. (In requests, a fixed bound
  would be too loose for replicas of few seats and too tight for many: four seats all busy on one
  replica and none on the other is the imbalance to stop, whatever the cache says.)
- session affinity (any policy): a request with a session key goes to the replica that rendezvous
  hashing picks for that key among the candidates, so one user's turns share a cache, unless that
  replica trips the load guard.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Protocol

POLICY_NAMES = ("round_robin", "least_load", "kv_aware")


@dataclass(slots=True)
class RouteRequest:
    model_name: str
    model_version: str = ""
    tenant: str = ""
    session_key: str = ""
    # The prompt's full-block hashes (services/common/kv_blocks.py), when the policy needs them and
    # the router could tokenize the prompt.
    block_hashes: list[bytes] | None = None


class Candidate(Protocol):
    """What a policy reads of a replica (services/router/pool.py Backend)."""

    instance_id: str
    load: object  # services.router.load.ReplicaLoad


@dataclass(frozen=True, slots=True)
class LoadGuard:
    abs_occupancy: float = 0.5
    ratio: float = 2.0

    def least_loaded_if_unbalanced(self, candidates: list) -> object | None:
        loads = [c.load.occupancy for c in candidates]
        low, high = min(loads), max(loads)
        if high - low > self.abs_occupancy and high > self.ratio * low:
            return _lowest(candidates, loads)
        return None


class RoutingPolicy:
    name = "policy"
    needs_prompt_blocks = False

    def choose(self, request: RouteRequest, candidates: list) -> object:
        raise NotImplementedError


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turns = itertools.count()

    def choose(self, request: RouteRequest, candidates: list) -> object:
        ordered = sorted(candidates, key=lambda c: c.instance_id)
        return ordered[next(self._turns) % len(ordered)]


class LeastLoad(RoutingPolicy):
    name = "least_load"

    def choose(self, request: RouteRequest, candidates: list) -> object:
        pair = candidates if len(candidates) <= 2 else random.sample(candidates, 2)
        return _lowest(pair, [c.load.num_requests for c in pair])


class KvAware(RoutingPolicy):
    name = "kv_aware"
    needs_prompt_blocks = True

    def __init__(self, kv_index, overlap_weight: float = 4.0, temperature: float = 0.0,
                 guard: LoadGuard = LoadGuard()):
        self.kv_index = kv_index
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.guard = guard
        self._fallback = LeastLoad()

    def choose(self, request: RouteRequest, candidates: list) -> object:
        if len(candidates) == 1:
            return candidates[0]
        guarded = self.guard.least_loaded_if_unbalanced(candidates)
        if guarded is not None:
            return guarded
        hashes = request.block_hashes
        if hashes is None:  # no prompt blocks (the tokenizer is not loaded yet): by load alone
            return self._fallback.choose(request, candidates)
        matched = self.kv_index.matched_blocks(hashes, [c.instance_id for c in candidates])
        costs = [
            self.overlap_weight * (len(hashes) - matched[c.instance_id]) + c.load.num_active_blocks
            for c in candidates
        ]
        if self.temperature > 0:
            return _softmax_pick(candidates, costs, self.temperature)
        return _lowest(candidates, costs)


class SessionAffinity(RoutingPolicy):
    """Wraps a policy: requests with a session key stick to one replica per key."""

    def __init__(self, inner: RoutingPolicy, guard: LoadGuard = LoadGuard()):
        self.inner = inner
        self.guard = guard
        self.name = inner.name
        self.needs_prompt_blocks = inner.needs_prompt_blocks

    def choose(self, request: RouteRequest, candidates: list) -> object:
        if not request.session_key or len(candidates) == 1:
            return self.inner.choose(request, candidates)
        chosen = max(candidates, key=lambda c: _rendezvous_weight(request.session_key, c.instance_id))
        guarded = self.guard.least_loaded_if_unbalanced(candidates)
        if guarded is not None and chosen.load.occupancy > guarded.load.occupancy + self.guard.abs_occupancy:
            return guarded
        return chosen


def make_policy(name: str, kv_index, overlap_weight: float = 4.0, temperature: float = 0.0,
                guard: LoadGuard = LoadGuard()) -> RoutingPolicy:
    if name == "round_robin":
        inner: RoutingPolicy = RoundRobin()
    elif name == "least_load":
        inner = LeastLoad()
    elif name == "kv_aware":
        inner = KvAware(kv_index, overlap_weight, temperature, guard)
    else:
        raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICY_NAMES)}")
    return SessionAffinity(inner, guard)


def _lowest(candidates: list, scores: list[float]) -> object:
    low = min(scores)
    return random.choice([c for c, s in zip(candidates, scores) if s == low])


def _softmax_pick(candidates: list, costs: list[float], temperature: float) -> object:
    low, high = min(costs), max(costs)
    scale = temperature * max(high - low, 1.0)
    weights = [math.exp(-(cost - low) / scale) for cost in costs]
    return random.choices(candidates, weights)[0]


def _rendezvous_weight(key: str, instance_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{instance_id}".encode(), digest_size=8).digest(), "big")
