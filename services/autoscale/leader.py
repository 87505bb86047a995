"""One acting autoscaler among several registries: a Consul session lock, with fencing.

Consul's documented leader election (https://developer.hashicorp.com/consul/docs/automate/
application-leader-election): each candidate creates a session with a TTL and tries
`PUT /v1/kv/<key>?acquire=<session>`; the one whose acquire returns true leads while its session
lives, renewing it well inside the TTL. A session that is not renewed is invalidated (no sooner
than its TTL, in practice up to twice it); with behaviour `release` the lock is freed, and no one
can take it again for the session's lock-delay.

**Fencing.** A leader may be paused (GC, SIGSTOP, a slow disk) past its TTL, lose the lock and wake
still believing it leads. So leading is not a flag but a token checked at each action:

- the token is the key's `LockIndex` when this session took it: Consul increments it on every
  successful acquire, so a newer leader always holds a larger one;
- `fence()` — called right before each scaling action — answers the token only if the session was
  renewed less than `ttl_s - safety_s` ago by the local monotonic clock (Consul never invalidates a
  session before its TTL, so no one else can hold the lock yet) *and* a read of the key shows this
  session still holding it with that LockIndex; otherwise None and the action is skipped;
- the actions carry the token on: the `local` actuator's store write refuses a token lower than the
  highest it has seen (services/registry/store.py `scale_deployment`), the `nomad` actuator sends it
  in the job scale request's Meta. Two leaders therefore never both act, even across a pause.

Without Consul (the embedded catalog) there is one registry and no election: `SoleLeader`.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

from services.common.consul_http import ConsulError, ConsulHttp, ConsulUnavailable
from services.common.telemetry import get_logger

log = get_logger(__name__)

LEADER_KEY = "tensoryard/autoscaler/leader"


class SoleLeader:
    """One registry, no election: always leads, with a constant token."""

    async def fence(self) -> int | None:
        return 1

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


class ConsulLeaderLock:
    def __init__(self, http: ConsulHttp, holder: str, key: str = LEADER_KEY, ttl_s: float = 10.0,
                 lock_delay_s: float = 5.0, safety_s: float | None = None, clock=time.monotonic):
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 (Consul's minimum is 10 s unless the agent lowers it), not {ttl_s}")
        self._http = http
        self.holder = holder  # written as the key's value: who leads, for operators
        self.key = key
        self.ttl_s = ttl_s
        self.lock_delay_s = lock_delay_s
        # Renewed every third of the TTL; trusted for the TTL less this margin (a renewal that Consul
        # handled late, a clock that ran slow).
        self.safety_s = ttl_s / 3 if safety_s is None else safety_s
        self._clock = clock
        self.session_id = ""
        self.token: int | None = None  # the LockIndex this session acquired; None: not leading
        self._renewed_at_s = float("-inf")  # when the last successful renewal was *sent*

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Create a session, keep it renewed, and take the lock whenever it is free; forever."""
        attempt = 0
        while True:
            try:
                if not self.session_id:
                    await self._create_session()
                await self._renew()
                if self.token is None and self.session_id:  # ("" : it was just invalidated)
                    await self._try_acquire()
                attempt = 0
            except ConsulUnavailable as error:
                if attempt == 0:
                    log.warning("autoscaler_leader_consul_unreachable", error=str(error), leading=self.token is not None)
                attempt += 1
            except ConsulError as error:
                log.warning("autoscaler_leader_consul_refused", error=str(error))
                attempt += 1
            await asyncio.sleep(self.ttl_s / 3)

    async def _create_session(self) -> None:
        body = {"Name": f"tensoryard autoscaler ({self.holder})", "TTL": f"{self.ttl_s:g}s",
                "Behavior": "release", "LockDelay": f"{self.lock_delay_s:g}s"}
        sent_s = self._clock()
        reply = await self._http.put("/v1/session/create", body)
        self.session_id = reply["ID"]
        self._renewed_at_s = sent_s
        log.info("autoscaler_session_created", session=self.session_id, ttl_s=self.ttl_s)

    async def _renew(self) -> None:
        sent_s = self._clock()
        try:
            await self._http.put(f"/v1/session/renew/{quote(self.session_id, safe='')}")
        except ConsulError as error:
            if error.status != 404:
                raise
            # Invalidated (it expired, or an operator destroyed it): whatever it held is gone.
            self._lost("session invalidated")
            self.session_id = ""
            return
        self._renewed_at_s = sent_s

    async def _try_acquire(self) -> None:
        acquired = await self._http.put_raw(self._key_path(), self.holder.encode(), {"acquire": self.session_id})
        if acquired is not True:
            return
        entry = await self._read()
        if entry is None or entry.get("Session") != self.session_id:
            return
        self.token = int(entry["LockIndex"])
        log.info("autoscaler_leader_acquired", session=self.session_id, fencing_token=self.token, holder=self.holder)

    async def _read(self) -> dict | None:
        try:
            entries, _ = await self._http.get(self._key_path(), {"consistent": ""})
        except ConsulError as error:
            if error.status == 404:
                return None
            raise
        return entries[0] if entries else None

    def _key_path(self) -> str:
        return "/v1/kv/" + quote(self.key, safe="/")

    def _lost(self, why: str) -> None:
        if self.token is not None:
            log.warning("autoscaler_leader_lost", why=why, fencing_token=self.token)
        self.token = None

    # -- what the controller asks -----------------------------------------------------------------

    async def fence(self) -> int | None:
        """The fencing token if this process may act now, else None (see the module docstring)."""
        token = self.token
        if token is None:
            return None
        if self._clock() - self._renewed_at_s >= self.ttl_s - self.safety_s:
            self._lost("session not renewed within its TTL")
            return None
        try:
            entry = await self._read()
        except (ConsulError, ConsulUnavailable):
            return None  # cannot confirm: do not act (the lock itself may still be ours)
        if entry is None or entry.get("Session") != self.session_id or int(entry["LockIndex"]) != token:
            self._lost("the lock is held by another session")
            return None
        return token

    async def close(self) -> None:
        """Give the lock up at once (a clean stop), so a follower need not wait out the TTL."""
        if not self.session_id:
            return
        try:
            if self.token is not None:
                await self._http.put_raw(self._key_path(), self.holder.encode(), {"release": self.session_id})
            await self._http.put(f"/v1/session/destroy/{quote(self.session_id, safe='')}")
        except (ConsulError, ConsulUnavailable) as error:
            log.warning("autoscaler_leader_release_failed", error=str(error))
        self.token = None
        self.session_id = ""
