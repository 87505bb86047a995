"""The Consul stand-in's KV store and sessions, which hold the KV store's locks.

Semantics followed (developer.hashicorp.com/consul/api-docs/kv, /session, docs/automate/session):
- a write takes the next index as the key's ModifyIndex; CreateIndex is kept while the key lives;
- `cas=0` writes only if the key is absent, `cas=N` only if ModifyIndex is N; DELETE with `cas` is
  true for an absent key, false on a mismatch;
- `acquire=S` takes the lock when it is free (LockIndex + 1, Session = S) or already S's (value updated,
  LockIndex unchanged); `release=S` frees it only when S holds it; both also write the value; a plain
  write to a locked key keeps the lock;
- a session is invalidated when destroyed, when its TTL runs out (Consul times it at twice the TTL,
  the TTL being a lower bound), or when one of its checks turns critical or goes away; its locks are
  then released (Behavior "release") or their keys deleted ("delete"), and for LockDelay (default
  15 s, at most 60 s) none of those keys can be acquired again. An explicit `release` sets no delay;
- Consul accepts session TTLs from 10 s to 24 h; the lower bound is a flag of the stand-in (a test knob).
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field

from tests.support.consul_state import Catalog, ConsulError, IndexClock, canonical_keys, parse_duration_s

SESSION_FIELDS = ("Name", "Node", "Checks", "NodeChecks", "ServiceChecks", "LockDelay", "Behavior", "TTL")
MAX_VALUE_BYTES = 512 * 1024
MAX_LOCK_DELAY_S = 60.0
MAX_SESSION_TTL_S = 86400.0
# Consul's SessionTTLMultiplier: a session expires at twice its TTL after the last renewal.
SESSION_TTL_MULTIPLIER = 2


@dataclass(slots=True)
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str = ""

    def to_json(self) -> dict:
        entry = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode() if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            entry["Session"] = self.session
        return entry


@dataclass(slots=True)
class Session:
    session_id: str
    name: str
    node: str
    behavior: str
    ttl: str  # as given, e.g. "10s"; Consul echoes the string
    ttl_s: float
    lock_delay_s: float
    node_checks: list[str]
    service_checks: list[str]
    create_index: int
    modify_index: int
    expires_at: float | None = None

    def to_json(self) -> dict:
        return {
            "ID": self.session_id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(self.lock_delay_s * 1e9),  # nanoseconds, as Consul's JSON has it
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": self.node_checks,
            "ServiceChecks": [{"ID": c, "Namespace": ""} for c in self.service_checks] or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Sessions:
    clock: IndexClock
    catalog: Catalog
    kv: "KVStore"
    session_ttl_min_s: float = 10.0
    sessions: dict[str, Session] = field(default_factory=dict)
    _index: int = 1

    def __post_init__(self):
        self.catalog.check_failed_listeners.append(self._check_failed)

    def create(self, body: dict) -> str:
        body = canonical_keys(body, SESSION_FIELDS)
        node = body.get("Node") or self.catalog.config.node_name
        if node != self.catalog.config.node_name:
            raise ConsulError(500, f"Missing node registration: {node!r}")
        behavior = body.get("Behavior") or "release"
        if behavior not in ("release", "delete"):
            raise ConsulError(400, f"Invalid Behavior setting '{behavior}'")
        ttl = body.get("TTL") or ""
        ttl_s = parse_duration_s(ttl, "Session TTL") if ttl else 0.0
        if ttl and not self.session_ttl_min_s <= ttl_s <= MAX_SESSION_TTL_S:
            raise ConsulError(400, f"Invalid Session TTL '{ttl}', must be between "
                              f"[{self.session_ttl_min_s:g}s={MAX_SESSION_TTL_S:g}s]")
        lock_delay_s = parse_duration_s(body.get("LockDelay", "15s"), "LockDelay")
        lock_delay_s = min(max(lock_delay_s, 0.0), MAX_LOCK_DELAY_S)
        node_checks = body.get("NodeChecks")
        if node_checks is None:
            node_checks = [] if body.get("ServiceChecks") else list(body.get("Checks") or ["serfHealth"])
        service_checks = [canonical_keys(c, ("ID",)).get("ID", "") if isinstance(c, dict) else c
                          for c in body.get("ServiceChecks") or []]
        with self.clock.cond:
            for check_id in [c for c in node_checks + service_checks if c != "serfHealth"]:
                check = self.catalog.checks.get(check_id)
                if check is None:
                    raise ConsulError(500, f"Missing check '{check_id}' registration")
                if check.status == "critical":
                    raise ConsulError(500, f"Check '{check_id}' is in critical state")
            index = self.clock.advance()
            session = Session(str(uuid.uuid4()), body.get("Name") or "", node, behavior, ttl, ttl_s, lock_delay_s,
                              list(node_checks), service_checks, index, index)
            self._renew_timer(session)
            self.sessions[session.session_id] = session
            self._index = index
            return session.session_id

    def renew(self, session_id: str) -> Session:
        with self.clock.cond:
            session = self.sessions.get(session_id)
            if session is None:
                raise ConsulError(404, f"Session id '{session_id}' not found")
            self._renew_timer(session)
            return session

    def destroy(self, session_id: str) -> None:
        with self.clock.cond:
            if session_id in self.sessions:
                self.invalidate(session_id)

    def invalidate(self, session_id: str) -> None:
        with self.clock.cond:
            session = self.sessions.pop(session_id)
            self.kv.session_invalidated(session)
            self._index = self.clock.advance()

    def tick(self, now: float) -> None:
        with self.clock.cond:
            for session in list(self.sessions.values()):
                if session.expires_at is not None and now >= session.expires_at:
                    self.invalidate(session.session_id)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def index(self) -> int:
        return self._index

    def _renew_timer(self, session: Session) -> None:
        if session.ttl_s > 0:
            session.expires_at = time.monotonic() + SESSION_TTL_MULTIPLIER * session.ttl_s

    def _check_failed(self, check_id: str) -> None:
        for session in list(self.sessions.values()):
            if check_id in session.node_checks or check_id in session.service_checks:
                self.invalidate(session.session_id)


@dataclass
class KVStore:
    clock: IndexClock
    sessions: Sessions | None = None  # set once Sessions is built (each needs the other)
    entries: dict[str, KVEntry] = field(default_factory=dict)
    # Deleted keys and the index of their deletion, so a blocking read of a prefix wakes on deletes.
    tombstones: dict[str, int] = field(default_factory=dict)
    lock_delays: dict[str, float] = field(default_factory=dict)  # key -> monotonic end of its delay
    _index: int = 1

    # ---- reads (callers hold the lock) -------------------------------------------------------

    def index_of(self, key: str, prefix: bool) -> int:
        """X-Consul-Index for a key (its ModifyIndex) or a prefix (the newest write or delete in it)."""
        if not prefix:
            entry = self.entries.get(key)
            if entry is not None:
                return entry.modify_index
        newest = max(
            [e.modify_index for k, e in self.entries.items() if k.startswith(key)]
            + [i for k, i in self.tombstones.items() if k.startswith(key)],
            default=0,
        )
        return newest or self._index

    def get(self, key: str) -> KVEntry | None:
        return self.entries.get(key)

    def under(self, prefix: str) -> list[KVEntry]:
        return [self.entries[k] for k in sorted(self.entries) if k.startswith(prefix)]

    def keys(self, prefix: str, separator: str) -> list[str]:
        found: list[str] = []
        for key in sorted(self.entries):
            if not key.startswith(prefix):
                continue
            if separator:
                cut = key.find(separator, len(prefix))
                key = key if cut < 0 else key[: cut + len(separator)]
            if not found or found[-1] != key:
                found.append(key)
        return found

    # ---- writes ------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, flags: int, cas: int | None, acquire: str, release: str) -> bool:
        if not key:
            raise ConsulError(400, "Missing key name")
        if len(value) > MAX_VALUE_BYTES:
            raise ConsulError(413, f"Request body too large, max size: {MAX_VALUE_BYTES} bytes")
        if acquire and release:
            raise ConsulError(400, "Conflicting flags: acquire and release")
        with self.clock.cond:
            existing = self.entries.get(key)
            if cas is not None and not _cas_matches(existing, cas):
                return False
            session, lock_index = (existing.session, existing.lock_index) if existing else ("", 0)
            if acquire:
                if self.sessions.get(acquire) is None:
                    raise ConsulError(500, f'invalid session "{acquire}"')
                if session and session != acquire:
                    return False
                if session != acquire:
                    if time.monotonic() < self.lock_delays.get(key, 0.0):
                        return False
                    lock_index += 1
                session = acquire
            elif release:
                if existing is None or session != release:
                    return False
                session = ""
            self._write(key, value, flags, lock_index, session)
            return True

    def delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        with self.clock.cond:
            if cas is not None and not recurse:
                existing = self.entries.get(key)
                if existing is None:
                    return True
                if existing.modify_index != cas:
                    return False
            if recurse:
                doomed = [k for k in self.entries if k.startswith(key)]
            else:
                doomed = [key] if key in self.entries else []
            if doomed:
                index = self.clock.advance()
                for doomed_key in doomed:
                    del self.entries[doomed_key]
                    self.tombstones[doomed_key] = index
                self._index = index
            return True

    def session_invalidated(self, session: Session) -> None:
        """Release or delete the session's locks, and start each key's lock-delay."""
        held = [e for e in self.entries.values() if e.session == session.session_id]
        if not held:
            return
        index = self.clock.advance()
        for entry in held:
            if session.lock_delay_s > 0:
                self.lock_delays[entry.key] = time.monotonic() + session.lock_delay_s
            if session.behavior == "delete":
                del self.entries[entry.key]
                self.tombstones[entry.key] = index
            else:
                entry.session = ""
                entry.modify_index = index
        self._index = index

    def _write(self, key: str, value: bytes, flags: int, lock_index: int, session: str) -> None:
        index = self.clock.advance()
        existing = self.entries.get(key)
        create_index = existing.create_index if existing else index
        self.entries[key] = KVEntry(key, value, flags, create_index, index, lock_index, session)
        self.tombstones.pop(key, None)
        self._index = index


def _cas_matches(existing: KVEntry | None, cas: int) -> bool:
    if cas == 0:
        return existing is None
    return existing is not None and existing.modify_index == cas
