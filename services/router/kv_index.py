"""Which replica holds which cached prompt blocks: the router's half of KV-aware routing.

Blocks are named by the chained hash of services/common/kv_blocks.py, so a prompt's i-th block hash
names its whole prefix up to that block; a replica's match for a prompt is the number of leading
block hashes it holds.

Two sources feed the index:
- **events**: replicas stream the hashes their prefix cache stores and evicts (a snapshot first),
  so the index follows each cache exactly, evictions included;
- **routed**: the hashes of the prompts this router sent to each replica, each kept for a TTL. It is
  the whole story for a replica that sends no events (the approximate mode), and a short overlay on
  top of events: a prompt routed a moment ago is not cached yet — its prefill has not run — but the
  next request with the same prefix should still follow it there rather than compute it again.

Memory is bounded: events mirror caches of bounded size, and each replica's routed entries are an
LRU capped at `max_routed_per_replica`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Replica:
    cached: set[bytes] = field(default_factory=set)  # from events
    routed: OrderedDict[bytes, float] = field(default_factory=OrderedDict)  # hash -> expiry (monotonic)
    has_events: bool = False


class KvIndex:
    def __init__(self, routed_ttl_s: float = 120.0, events_overlay_ttl_s: float = 2.0,
                 max_routed_per_replica: int = 200_000, clock=time.monotonic):
        self.routed_ttl_s = routed_ttl_s
        self.events_overlay_ttl_s = events_overlay_ttl_s
        self.max_routed_per_replica = max_routed_per_replica
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    # -- updates ---------------------------------------------------------------------------------

    def apply_events(self, replica_id: str, stored, removed, snapshot: bool) -> None:
        replica = self._replicas.setdefault(replica_id, _Replica())
        replica.has_events = True
        if snapshot:
            replica.cached = set(stored)
            return
        replica.cached.difference_update(removed)
        replica.cached.update(stored)

    def record_routed(self, replica_id: str, block_hashes: list[bytes]) -> None:
        """This router sent a prompt with these block hashes to replica_id."""
        if not block_hashes:
            return
        replica = self._replicas.setdefault(replica_id, _Replica())
        ttl_s = self.events_overlay_ttl_s if replica.has_events else self.routed_ttl_s
        expiry = self._clock() + ttl_s
        routed = replica.routed
        for block_hash in block_hashes:
            routed[block_hash] = expiry
            routed.move_to_end(block_hash)
        while len(routed) > self.max_routed_per_replica:
            routed.popitem(last=False)

    def remove_replica(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def lose_events(self, replica_id: str) -> None:
        """The replica's event stream broke: until a new snapshot, only routed entries count."""
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.has_events = False
            replica.cached = set()

    # -- queries ---------------------------------------------------------------------------------

    def has_events(self, replica_id: str) -> bool:
        replica = self._replicas.get(replica_id)
        return replica is not None and replica.has_events

    def matched_blocks(self, block_hashes: list[bytes], replica_ids: list[str]) -> dict[str, int]:
        """For each replica: how many leading blocks of the prompt it holds (or was just sent)."""
        now = self._clock()
        matches = {}
        for replica_id in replica_ids:
            replica = self._replicas.get(replica_id)
            count = 0
            if replica is not None:
                for block_hash in block_hashes:
                    if block_hash in replica.cached or self._routed_live(replica, block_hash, now):
                        count += 1
                    else:
                        break
            matches[replica_id] = count
        return matches

    @staticmethod
    def _routed_live(replica: _Replica, block_hash: bytes, now: float) -> bool:
        expiry = replica.routed.get(block_hash)
        if expiry is None:
            return False
        if expiry < now:
            del replica.routed[block_hash]
            return False
        return True

    def num_cached(self, replica_id: str) -> int:
        replica = self._replicas.get(replica_id)
        return len(replica.cached) if replica else 0
