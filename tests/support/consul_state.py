"""The Consul stand-in's agent and catalog: one index clock, services, their checks, and the reaper.

Everything here is guarded by one lock, `IndexClock.cond` (re-entrant), the way Consul's state store
serialises writes through Raft. Every write that changes what a query returns takes the next index,
so blocking queries wake exactly when Consul's would (a spurious wake-up is allowed; Consul documents
that a return is no guarantee of a change).

Semantics followed (developer.hashicorp.com/consul/api-docs/agent/service, /agent/check, /health):
- a check starts critical unless `Status` is given; re-registering a service keeps the status and
  output of a check that already exists (Consul restores them from a snapshot, so a re-register does
  not flap) and restarts its TTL timer; an identical re-register takes no new index;
- a TTL check turns critical with output "TTL expired" once its TTL passes without an update, and
  pass/warn/fail (or update) resets the TTL;
- `DeregisterCriticalServiceAfter` removes the whole service once its check has been critical that
  long; Consul clamps it to at least one minute and its reaper runs every 30 s, so removal can come up
  to one reaper interval late. Both numbers are flags of the stand-in (test knobs, Consul's by default);
- an update that only changes a check's output is stored but takes no new index (Consul defers such
  writes, `check_update_interval`, 5 m by default); a status change always takes one.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

STATUSES = ("passing", "warning", "critical")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


SERVICE_FIELDS = ("ID", "Name", "Tags", "Address", "Port", "Meta", "Weights", "Check", "Checks",
                  "EnableTagOverride", "Kind", "TaggedAddresses")
CHECK_FIELDS = ("CheckID", "ID", "Name", "Notes", "Status", "Output", "ServiceID", "TTL", "GRPC", "GRPCUseTLS",
                "TCP", "HTTP", "Method", "Header", "Body", "Interval", "Timeout", "DeregisterCriticalServiceAfter",
                "Args", "ScriptArgs", "DockerContainerID", "Shell", "H2PING", "UDP", "AliasNode", "AliasService",
                "TLSServerName", "TLSSkipVerify", "SuccessBeforePassing", "FailuresBeforeCritical")


def canonical_keys(raw: dict, names: tuple[str, ...]) -> dict:
    """Field names as Consul reads them: Go's JSON decoding ignores case ("ttl" is TTL, which is what
    python clients such as py-consul send) and Consul also takes snake_case ("deregister_critical_...").
    Only field names are folded, never user data such as Meta keys."""
    by_folded = {_fold(name): name for name in names}
    return {by_folded.get(_fold(key), key): value for key, value in raw.items()}


def _fold(name: str) -> str:
    return name.replace("_", "").lower()


class ConsulError(Exception):
    """An error Consul answers with this HTTP status and this plain-text body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_duration_s(value, what: str) -> float:
    """Go's time.ParseDuration ("10s", "1m30s", "250ms"); a JSON number is nanoseconds, as Go decodes it."""
    if isinstance(value, bool):
        raise ConsulError(400, f"Invalid {what}: {value!r}")
    if isinstance(value, (int, float)):
        return value / 1e9
    text = str(value).strip()
    if text in ("", "0"):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(number + unit for number, unit in parts) != body:
        raise ConsulError(400, f"Invalid {what}: time: invalid duration {text!r}")
    return sign * sum(float(number) * _UNIT_S[unit] for number, unit in parts)


class IndexClock:
    """Consul's Raft index: starts at 1, only moves forward, wakes blocking queries when it does."""

    def __init__(self):
        self.cond = threading.Condition(threading.RLock())
        self.index = 1

    def advance(self) -> int:
        with self.cond:
            self.index += 1
            self.cond.notify_all()
            return self.index

    def wait_past(self, index_of: Callable[[], int], min_index: int, timeout_s: float) -> None:
        """Block (lock held, released while waiting) until index_of() > min_index or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while index_of() <= min_index:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return
                self.cond.wait(remaining_s)


@dataclass(slots=True)
class Service:
    service_id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    create_index: int
    modify_index: int
    # The built-in "consul" service lives in the catalog only, never in the agent's own list.
    local: bool = True


@dataclass(slots=True)
class Check:
    check_id: str
    name: str
    service_id: str
    kind: str  # "ttl", "grpc", "tcp", "http"
    status: str
    output: str
    notes: str
    definition: dict  # what the client sent, normalised: compared on re-register
    ttl_s: float = 0.0
    interval_s: float = 0.0
    timeout_s: float = 10.0
    deregister_after_s: float = 0.0
    create_index: int = 0
    modify_index: int = 0
    expires_at: float | None = None  # monotonic; TTL checks only
    critical_since: float | None = None  # monotonic


@dataclass
class AgentConfig:
    node_name: str = "standin"
    node_id: str = "00000000-0000-0000-0000-00000000c0de"
    datacenter: str = "dc1"
    address: str = "127.0.0.1"
    deregister_critical_min_s: float = 60.0
    reap_interval_s: float = 30.0


@dataclass
class Catalog:
    clock: IndexClock
    config: AgentConfig
    services: dict[str, Service] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    # Called (lock held) with a check ID when that check turns critical or goes away: sessions bound
    # to it are invalidated. Probes (gRPC/TCP/HTTP) are started and stopped through these hooks.
    check_failed_listeners: list[Callable[[str], None]] = field(default_factory=list)
    start_probe: Callable[[Check], None] = lambda check: None
    stop_probe: Callable[[str], None] = lambda check_id: None
    _health_index: dict[str, int] = field(default_factory=dict)
    _catalog_index: dict[str, int] = field(default_factory=dict)
    _services_index: int = 1
    _last_reap: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        index = self.clock.advance()
        self.services["consul"] = Service("consul", "consul", [], "", 8300, {}, _weights(None), index, index, False)
        self._touch("consul", index, catalog=True)

    # ---- writes -----------------------------------------------------------------------------

    def register_service(self, body: dict, replace_existing_checks: bool = False) -> None:
        body = canonical_keys(body, SERVICE_FIELDS)
        service = _service_from(body)
        # Every check is checked before anything changes: a bad check rejects the whole registration.
        new_checks = [_check_from(d, self.config) for d in _check_defs_from(body, service.service_id, service.name)]
        with self.clock.cond:
            old = self.services.get(service.service_id)
            if old is not None and not old.local:
                raise ConsulError(400, f"Service ID {service.service_id!r} is reserved")
            if old is None or _service_fields(old) != _service_fields(service):
                index = self.clock.advance()
                service.create_index = old.create_index if old else index
                service.modify_index = index
                self.services[service.service_id] = service
                if old is not None and old.name != service.name:
                    self._touch(old.name, index, catalog=True)
                self._touch(service.name, index, catalog=True)
            kept_ids = set()
            for check in new_checks:
                self._put_check(check)
                kept_ids.add(check.check_id)
            if replace_existing_checks:
                for check in [c for c in self.checks.values() if c.service_id == service.service_id]:
                    if check.check_id not in kept_ids:
                        self._remove_check(check.check_id)

    def deregister_service(self, service_id: str) -> None:
        with self.clock.cond:
            service = self.services.get(service_id)
            if service is None or not service.local:
                raise ConsulError(404, f'Unknown service ID "{service_id}"')
            for check in [c for c in self.checks.values() if c.service_id == service_id]:
                self._remove_check(check.check_id)
            del self.services[service_id]
            self._touch(service.name, self.clock.advance(), catalog=True)

    def register_check(self, body: dict) -> None:
        """PUT /v1/agent/check/register: a check of its own, on the node or on ServiceID."""
        body = canonical_keys(body, CHECK_FIELDS)
        service_id = body.get("ServiceID") or ""
        if service_id and service_id not in self.services:
            raise ConsulError(404, f'ServiceID "{service_id}" does not exist')
        definition = _check_def(body, service_id, default_id=body.get("Name") or "")
        if not definition["CheckID"]:
            raise ConsulError(400, "Missing check name")
        check = _check_from(definition, self.config)
        with self.clock.cond:
            self._put_check(check)

    def deregister_check(self, check_id: str) -> None:
        with self.clock.cond:
            if check_id not in self.checks:
                raise ConsulError(404, f'Unknown check ID "{check_id}"')
            self._remove_check(check_id)

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        """pass/warn/fail/update: set the status and push the TTL deadline forward."""
        if status not in STATUSES:
            raise ConsulError(400, f'Invalid check status: "{status}"')
        with self.clock.cond:
            check = self.checks.get(check_id)
            if check is None:
                raise ConsulError(404, f'Unknown check ID "{check_id}"')
            if check.kind != "ttl":
                raise ConsulError(500, f'CheckID "{check_id}" does not have associated TTL')
            check.expires_at = time.monotonic() + check.ttl_s
            self.set_status(check_id, status, output)

    def set_status(self, check_id: str, status: str, output: str) -> None:
        with self.clock.cond:
            check = self.checks.get(check_id)
            if check is None:  # removed while a probe was running
                return
            check.output = output
            if check.status == status:
                return
            check.status = status
            check.critical_since = time.monotonic() if status == "critical" else None
            check.modify_index = self.clock.advance()
            self._touch(self._service_name(check), check.modify_index, catalog=False)
            if status == "critical":
                for listener in self.check_failed_listeners:
                    listener(check_id)

    def tick(self, now: float) -> None:
        """TTL expiry on every tick; the critical-service reaper once per reap interval."""
        with self.clock.cond:
            for check in list(self.checks.values()):
                if check.kind == "ttl" and check.expires_at is not None and now >= check.expires_at:
                    check.expires_at = None
                    self.set_status(check.check_id, "critical", "TTL expired")
            if now - self._last_reap < self.config.reap_interval_s:
                return
            self._last_reap = now
            for check in list(self.checks.values()):
                if (
                    check.deregister_after_s > 0
                    and check.critical_since is not None
                    and now - check.critical_since >= check.deregister_after_s
                    and check.service_id in self.services
                ):
                    self.deregister_service(check.service_id)

    def _put_check(self, check: Check) -> None:
        check_id = check.check_id
        old = self.checks.get(check_id)
        if old is not None and old.definition == check.definition:
            old.expires_at = check.expires_at  # the agent restarts the TTL timer; nothing else changes
            return
        if old is not None:
            self.stop_probe(check_id)
            # Consul restores a re-registered check's status and output from its snapshot of the old one.
            check.status, check.output, check.critical_since = old.status, old.output, old.critical_since
        check.create_index = old.create_index if old else 0
        check.modify_index = self.clock.advance()
        check.create_index = check.create_index or check.modify_index
        self.checks[check_id] = check
        self._touch(self._service_name(check), check.modify_index, catalog=False)
        if check.kind != "ttl":
            self.start_probe(check)

    def _remove_check(self, check_id: str) -> None:
        check = self.checks.pop(check_id)
        self.stop_probe(check_id)
        self._touch(self._service_name(check), self.clock.advance(), catalog=False)
        for listener in self.check_failed_listeners:
            listener(check_id)

    def _touch(self, service_name: str, index: int, catalog: bool) -> None:
        if not service_name:
            return
        self._health_index[service_name] = index
        if catalog:
            self._catalog_index[service_name] = index
            self._services_index = index

    def _service_name(self, check: Check) -> str:
        service = self.services.get(check.service_id)
        return service.name if service else ""

    # ---- reads (callers hold the lock) --------------------------------------------------------

    def health_index(self, name: str) -> int:
        return self._health_index.get(name, self._services_index)

    def catalog_index(self, name: str) -> int:
        return self._catalog_index.get(name, self._services_index)

    def services_index(self) -> int:
        return self._services_index

    def instances(self, name: str, tags: list[str]) -> list[Service]:
        found = [s for s in self.services.values() if s.name == name and all(t in s.tags for t in tags)]
        return sorted(found, key=lambda s: s.service_id)

    def checks_of(self, service_id: str) -> list[Check]:
        return sorted((c for c in self.checks.values() if c.service_id == service_id), key=lambda c: c.check_id)


def _weights(value) -> dict[str, int]:
    weights = {"Passing": 1, "Warning": 1}
    if isinstance(value, dict):
        weights.update({k: int(v) for k, v in canonical_keys(value, ("Passing", "Warning")).items() if k in weights})
    return weights


def _service_from(body: dict) -> Service:
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise ConsulError(400, "Missing service name")
    port = body.get("Port", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConsulError(400, f"Invalid service port: {port!r}")
    tags = body.get("Tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConsulError(400, "Invalid service tags: must be a list of strings")
    meta = body.get("Meta") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ConsulError(400, "Invalid service meta: must be an object of strings")
    address = body.get("Address") or ""
    service_id = body.get("ID") or name
    return Service(service_id, name, list(tags), address, port, dict(meta), _weights(body.get("Weights")), 0, 0)


def _service_fields(service: Service) -> tuple:
    return (service.name, service.tags, service.address, service.port, service.meta, service.weights)


def _check_defs_from(body: dict, service_id: str, service_name: str) -> list[dict]:
    single, several = body.get("Check"), body.get("Checks")
    if single and several:
        raise ConsulError(400, "Invalid service: give Check or Checks, not both")
    if several and not isinstance(several, list):
        raise ConsulError(400, "Invalid service: Checks must be a list")
    raws = [single] if single else list(several or [])
    # Consul numbers default check IDs ("service:<id>:<n>", from 1) only when there are several.
    definitions = [_check_def(raw, service_id, f"service:{service_id}" + (f":{n}" if len(raws) > 1 else ""))
                   for n, raw in enumerate(raws, 1)]
    for definition in definitions:
        definition.setdefault("Name", f"Service '{service_name}' check")
    return definitions


def _check_def(raw, service_id: str, default_id: str) -> dict:
    if not isinstance(raw, dict):
        raise ConsulError(400, "Invalid check: must be an object")
    raw = canonical_keys(raw, CHECK_FIELDS)
    definition = {k: v for k, v in raw.items() if v not in (None, "")}
    definition["CheckID"] = raw.get("CheckID") or raw.get("ID") or default_id
    definition["ServiceID"] = service_id
    definition.pop("ID", None)
    return definition


def _check_from(definition: dict, config: AgentConfig) -> Check:
    check_id = definition["CheckID"]
    kinds = [kind for kind in ("TTL", "GRPC", "TCP", "HTTP") if kind in definition]
    if len(kinds) != 1:
        raise ConsulError(400, f"Invalid check {check_id!r}: give exactly one of TTL, GRPC, TCP or HTTP "
                          "(script, Docker, H2PING, UDP and alias checks are not supported by the stand-in)")
    kind = kinds[0].lower()
    status = definition.get("Status", "critical")
    if status not in STATUSES:
        raise ConsulError(400, f'Invalid initial check status: "{status}"')
    if definition.get("GRPCUseTLS"):
        raise ConsulError(400, f"Invalid check {check_id!r}: GRPCUseTLS is not supported by the stand-in")
    check = Check(
        check_id=check_id,
        name=definition.get("Name") or check_id,
        service_id=definition["ServiceID"],
        kind=kind,
        status=status,
        output=definition.get("Output", ""),
        notes=definition.get("Notes", ""),
        definition=definition,
    )
    if kind == "ttl":
        check.ttl_s = parse_duration_s(definition["TTL"], "TTL")
        if check.ttl_s <= 0:
            raise ConsulError(400, f"Invalid check {check_id!r}: TTL must be > 0 for TTL checks")
        check.expires_at = time.monotonic() + check.ttl_s
    else:
        check.interval_s = parse_duration_s(definition.get("Interval", ""), "Interval")
        if check.interval_s <= 0:
            raise ConsulError(400, f"Invalid check {check_id!r}: Interval must be > 0 for HTTP, TCP or gRPC checks")
        if "Timeout" in definition:
            check.timeout_s = parse_duration_s(definition["Timeout"], "Timeout")
    if "DeregisterCriticalServiceAfter" in definition and check.service_id:
        after_s = parse_duration_s(definition["DeregisterCriticalServiceAfter"], "DeregisterCriticalServiceAfter")
        check.deregister_after_s = max(after_s, config.deregister_critical_min_s) if after_s > 0 else 0.0
    if status == "critical":
        check.critical_since = time.monotonic()
    return check
