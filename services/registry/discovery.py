"""The embedded discovery catalog: instances held by leases, and a KV store with check-and-set.

Semantics follow Consul's, so the Consul backend can stand in for it: an instance stays listed
while its lease is renewed within its TTL (a TTL check); every change raises the catalog `index`,
and a watch is a blocking query that returns when the index passes the caller's. KV entries carry
a `modify_index`; a put with `cas_index` succeeds only when it still matches (0: key absent).

All state is owned by the asyncio loop of the registry process: no locks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, NotFound


@dataclass(slots=True)
class InstanceRecord:
    instance_id: str
    service: str
    address: str
    model_name: str
    model_version: str
    metadata: dict[str, str]
    lease_id: str
    ttl_ms: int
    expires_at_s: float


@dataclass(frozen=True, slots=True)
class KVRecord:
    key: str
    value: bytes
    modify_index: int


@dataclass(slots=True)
class DiscoveryCatalog:
    """Instances by id, leases by id, KV by key, and the index that orders every change."""

    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    lease_to_instance: dict[str, str] = field(default_factory=dict)
    kv: dict[str, KVRecord] = field(default_factory=dict)
    index: int = 1
    # Set (and replaced) on every change: waiters hold the event of the index they saw.
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _clock: object = time.monotonic

    def _bump(self) -> int:
        self.index += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self.index

    # -- instances ---------------------------------------------------------------------------

    def register(self, instance: InstanceRecord) -> str:
        if not instance.instance_id or not instance.address or not instance.service:
            raise InvalidArgument("an instance needs instance_id, service and address")
        if instance.ttl_ms < 100:
            raise InvalidArgument(f"ttl_ms must be >= 100, not {instance.ttl_ms}")
        old = self.instances.get(instance.instance_id)
        if old is not None:
            self.lease_to_instance.pop(old.lease_id, None)
        instance.lease_id = uuid.uuid4().hex
        instance.expires_at_s = self._clock() + instance.ttl_ms / 1000
        self.instances[instance.instance_id] = instance
        self.lease_to_instance[instance.lease_id] = instance.instance_id
        self._bump()
        return instance.lease_id

    def heartbeat(self, lease_id: str) -> None:
        instance_id = self.lease_to_instance.get(lease_id)
        if instance_id is None:
            raise NotFound(f"lease {lease_id!r} is unknown or expired: register again")
        instance = self.instances[instance_id]
        instance.expires_at_s = self._clock() + instance.ttl_ms / 1000

    def deregister(self, instance_id: str) -> None:
        instance = self.instances.pop(instance_id, None)
        if instance is None:
            return
        self.lease_to_instance.pop(instance.lease_id, None)
        self._bump()

    def expire(self) -> list[str]:
        """Drop instances whose lease ran out; returns their ids."""
        now = self._clock()
        expired = [i.instance_id for i in self.instances.values() if i.expires_at_s < now]
        for instance_id in expired:
            self.deregister(instance_id)
        return expired

    def list(self, service: str = "", model_name: str = "") -> list[InstanceRecord]:
        return [
            i
            for i in self.instances.values()
            if (not service or i.service == service) and (not model_name or i.model_name == model_name)
        ]

    async def wait_for_change(self, after_index: int, timeout_s: float) -> bool:
        """Block until the index passes `after_index` (True) or the timeout ends (False)."""
        deadline = time.monotonic() + timeout_s
        while self.index <= after_index:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining_s)
            except TimeoutError:
                return False
        return True

    # -- KV ------------------------------------------------------------------------------------

    def kv_get(self, key: str, prefix: bool = False) -> list[KVRecord]:
        if prefix:
            return [r for k, r in sorted(self.kv.items()) if k.startswith(key)]
        record = self.kv.get(key)
        return [record] if record else []

    def kv_put(self, key: str, value: bytes, cas_index: int | None = None) -> tuple[bool, int]:
        if not key or key.startswith("/"):
            raise InvalidArgument(f"KV key must be non-empty and relative, not {key!r}")
        current = self.kv.get(key)
        if cas_index is not None:
            current_index = current.modify_index if current else 0
            if current_index != cas_index:
                return False, current_index
        index = self._bump()
        self.kv[key] = KVRecord(key, value, index)
        return True, index

    def kv_delete(self, key: str) -> None:
        if self.kv.pop(key, None) is not None:
            self._bump()


def new_instance_id() -> str:
    return uuid.uuid4().hex[:12]

