"""The Consul stand-in's HTTP face: Consul's routes, blocking queries, ACL tokens, response shapes.

Handlers only translate: they parse the request, call the catalog, KV store or sessions
(tests/support/consul_state.py, consul_kv.py), and write Consul's JSON. Errors are plain-text bodies
with Consul's status codes, as Consul sends them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.consul_state import ConsulError, canonical_keys, parse_duration_s

if TYPE_CHECKING:
    from tests.support.consul_standin import ConsulStandin

DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
SERF_HEALTH = {"Node": "", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
               "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
               "ServiceTags": [], "Type": "", "Definition": {}, "CreateIndex": 1, "ModifyIndex": 1}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Consul's clients expect
    standin: ConsulStandin  # set on the subclass made by make_server

    def do_GET(self):
        self._serve("GET")

    def do_PUT(self):
        self._serve("PUT")

    def do_POST(self):  # Consul's write endpoints take PUT: POST gets its 405
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    def log_message(self, format, *args):
        sys.stderr.write("consul-standin: %s %s\n" % (self.address_string(), format % args))

    # ---- plumbing ---------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.url_path = unquote(parts.path)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.extra_headers: dict[str, str] = {}
        try:
            self._check_acl()
            if "filter" in self.query:
                raise ConsulError(400, "?filter expressions are not supported by the Consul stand-in")
            dc = self._param("dc")
            if dc and dc != self.standin.config.datacenter:
                raise ConsulError(500, "No path to datacenter")
            status, payload = self._route(method)
        except ConsulError as error:
            status, payload = error.status, error.message
        self._reply(status, payload)

    def _reply(self, status: int, payload) -> None:
        if payload is None:  # Consul's writes to the agent answer 200 with an empty body
            body, content_type = b"", "application/json"
        elif isinstance(payload, bytes):
            body, content_type = payload, "application/octet-stream"
        elif isinstance(payload, str) and status >= 400:
            body, content_type = payload.encode(), "text/plain; charset=utf-8"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a blocking query; Consul drops the answer too

    def _check_acl(self) -> None:
        expected = self.standin.acl_token
        if expected is None or self.url_path.startswith("/v1/status/"):
            return
        # Consul's order: the X-Consul-Token header, then Authorization: Bearer, then ?token=.
        authorization = self.headers.get("Authorization") or ""
        bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
        token = self.headers.get("X-Consul-Token") or bearer or self._param("token")
        if not token:
            raise ConsulError(403, "Permission denied: anonymous token lacks permission (default policy deny)")
        if token != expected:
            raise ConsulError(403, "ACL not found")

    def _param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[-1] if values else default

    def _flag(self, name: str) -> bool:
        return name in self.query and self._param(name).lower() not in ("false", "0")

    def _int_param(self, name: str) -> int | None:
        text = self._param(name)
        if name not in self.query:
            return None
        if not re.fullmatch(r"\d+", text):
            raise ConsulError(400, f"Invalid {name}: {text!r}")
        return int(text)

    def _json_body(self) -> dict:
        if not self.body.strip():
            return {}
        try:
            body = json.loads(self.body)
        except ValueError as error:
            raise ConsulError(400, f"Request decode failed: {error}") from None
        if not isinstance(body, dict):
            raise ConsulError(400, "Request decode failed: expected a JSON object")
        return body

    def _blocking(self, index_of, read):
        """Run `read` once the index passes ?index (or ?wait runs out); set X-Consul-Index."""
        min_index = self._int_param("index") or 0
        wait_s = DEFAULT_WAIT_S
        if "wait" in self.query:
            wait_s = parse_duration_s(self._param("wait"), "wait time")
            if wait_s < 0:
                raise ConsulError(400, "Invalid wait time")
        wait_s = min(wait_s or DEFAULT_WAIT_S, MAX_WAIT_S)
        clock = self.standin.clock
        with clock.cond:
            if min_index > 0:
                clock.wait_past(index_of, min_index, wait_s + random.uniform(0, wait_s / 16))
            index = max(1, index_of())
            result = read()
        self.extra_headers.update({"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true",
                                   "X-Consul-LastContact": "0"})
        return result

    # ---- routes -----------------------------------------------------------------------------

    def _route(self, method: str):
        path = self.url_path
        routes = [
            ("GET", r"/v1/status/leader", lambda: (200, f"{self.standin.config.address}:8300")),
            ("GET", r"/v1/status/peers", lambda: (200, [f"{self.standin.config.address}:8300"])),
            ("GET", r"/v1/agent/self", self._agent_self),
            ("GET", r"/v1/agent/services", self._agent_services),
            ("GET", r"/v1/agent/checks", self._agent_checks),
            ("GET", r"/v1/agent/service/(?!register$)(?P<id>[^/]+)", self._agent_service),
            ("PUT", r"/v1/agent/service/register", self._register_service),
            ("PUT", r"/v1/agent/service/deregister/(?P<id>.+)", self._deregister_service),
            ("PUT", r"/v1/agent/check/register", self._register_check),
            ("PUT", r"/v1/agent/check/deregister/(?P<id>.+)", self._deregister_check),
            ("PUT", r"/v1/agent/check/(?P<verb>pass|warn|fail|update)/(?P<id>.+)", self._update_check),
            ("GET", r"/v1/health/service/(?P<name>[^/]+)", self._health_service),
            ("GET", r"/v1/catalog/services", self._catalog_services),
            ("GET", r"/v1/catalog/service/(?P<name>[^/]+)", self._catalog_service),
            ("GET", r"/v1/kv/(?P<key>.*)", self._kv_get),
            ("PUT", r"/v1/kv/(?P<key>.*)", self._kv_put),
            ("DELETE", r"/v1/kv/(?P<key>.*)", self._kv_delete),
            ("PUT", r"/v1/session/create", self._session_create),
            ("PUT", r"/v1/session/renew/(?P<id>[^/]+)", self._session_renew),
            ("PUT", r"/v1/session/destroy/(?P<id>[^/]+)", self._session_destroy),
            ("GET", r"/v1/session/info/(?P<id>[^/]+)", self._session_info),
            ("GET", r"/v1/session/list", self._session_list),
        ]
        allowed = []
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                if route_method == method:
                    return handler(**match.groupdict())
                allowed.append(route_method)
        if allowed:
            raise ConsulError(405, f"method {method} not allowed")
        raise ConsulError(404, f"Unknown path {path!r} (not served by the Consul stand-in)")

    def _agent_self(self):
        config = self.standin.config
        return 200, {
            "Config": {"Datacenter": config.datacenter, "PrimaryDatacenter": config.datacenter,
                       "NodeName": config.node_name, "NodeID": config.node_id, "Server": True,
                       "Revision": "standin", "Version": "1.20.0"},
            "Member": {"Name": config.node_name, "Addr": config.address, "Port": 8301, "Status": 1,
                       "Tags": {"dc": config.datacenter, "role": "consul"}},
            "Meta": {"consul-network-segment": ""},
        }

    def _agent_services(self):
        with self.standin.clock.cond:
            services = [s for s in self.standin.catalog.services.values() if s.local]
            return 200, {s.service_id: self._agent_service_json(s) for s in services}

    def _agent_service(self, id):
        with self.standin.clock.cond:
            service = self.standin.catalog.services.get(id)
            if service is None or not service.local:
                raise ConsulError(404, f"unknown service ID: {id}")
            return 200, self._agent_service_json(service)

    def _agent_checks(self):
        with self.standin.clock.cond:
            return 200, {c.check_id: self._check_json(c) for c in self.standin.catalog.checks.values()}

    def _register_service(self):
        self.standin.catalog.register_service(self._json_body(), self._flag("replace-existing-checks"))
        return 200, None

    def _deregister_service(self, id):
        self.standin.catalog.deregister_service(id)
        return 200, None

    def _register_check(self):
        self.standin.catalog.register_check(self._json_body())
        return 200, None

    def _deregister_check(self, id):
        self.standin.catalog.deregister_check(id)
        return 200, None

    def _update_check(self, verb, id):
        if verb == "update":
            body = canonical_keys(self._json_body(), ("Status", "Output"))
            status, output = body.get("Status", ""), body.get("Output", "")
        else:
            status = {"pass": "passing", "warn": "warning", "fail": "critical"}[verb]
            output = self._param("note")
        self.standin.catalog.update_ttl(id, status, output)
        return 200, None

    def _health_service(self, name):
        catalog, tags = self.standin.catalog, self.query.get("tag", [])
        passing = self._flag("passing")

        def read():
            entries = []
            for service in catalog.instances(name, tags):
                checks = [{**SERF_HEALTH, "Node": self.standin.config.node_name}]
                checks += [self._check_json(c) for c in catalog.checks_of(service.service_id)]
                if passing and any(c["Status"] != "passing" for c in checks):
                    continue
                entries.append({"Node": self._node_json(), "Service": self._service_json(service), "Checks": checks})
            return entries

        return 200, self._blocking(lambda: catalog.health_index(name), read)

    def _catalog_services(self):
        catalog = self.standin.catalog

        def read():
            names: dict[str, list[str]] = {}
            for service in catalog.services.values():
                names.setdefault(service.name, [])
                names[service.name].extend(t for t in service.tags if t not in names[service.name])
            return names

        return 200, self._blocking(catalog.services_index, read)

    def _catalog_service(self, name):
        catalog, config = self.standin.catalog, self.standin.config
        node = {"ID": config.node_id, "Node": config.node_name, "Address": config.address,
                "Datacenter": config.datacenter, "TaggedAddresses": {"lan": config.address}, "NodeMeta": {}}

        def read():
            return [
                {**node, "ServiceID": s.service_id, "ServiceName": s.name, "ServiceTags": s.tags,
                 "ServiceAddress": s.address, "ServicePort": s.port, "ServiceMeta": s.meta,
                 "ServiceWeights": s.weights, "ServiceEnableTagOverride": False,
                 "CreateIndex": s.create_index, "ModifyIndex": s.modify_index}
                for s in catalog.instances(name, self.query.get("tag", []))
            ]

        return 200, self._blocking(lambda: catalog.catalog_index(name), read)

    def _kv_get(self, key):
        kv = self.standin.kv
        listing = self._flag("recurse") or "keys" in self.query
        if not key and not listing:
            raise ConsulError(400, "Missing key name")

        def read():
            if "keys" in self.query:
                return kv.keys(key, self._param("separator"))
            if self._flag("recurse"):
                return [e.to_json() for e in kv.under(key)]
            entry = kv.get(key)
            return None if entry is None else (entry.value if "raw" in self.query else [entry.to_json()])

        result = self._blocking(lambda: kv.index_of(key, prefix=listing), read)
        if not result and result != b"":
            return 404, b""
        return 200, result

    def _kv_put(self, key):
        flags = self._int_param("flags") or 0
        done = self.standin.kv.put(key, self.body, flags, self._int_param("cas"),
                                   self._param("acquire"), self._param("release"))
        return 200, done

    def _kv_delete(self, key):
        return 200, self.standin.kv.delete(key, self._flag("recurse"), self._int_param("cas"))

    def _session_create(self):
        return 200, {"ID": self.standin.sessions.create(self._json_body())}

    def _session_renew(self, id):
        return 200, [self.standin.sessions.renew(id).to_json()]

    def _session_destroy(self, id):
        self.standin.sessions.destroy(id)
        return 200, True

    def _session_info(self, id):
        sessions = self.standin.sessions

        def read():
            session = sessions.get(id)
            return [session.to_json()] if session else []

        return 200, self._blocking(sessions.index, read)

    def _session_list(self):
        sessions = self.standin.sessions
        return 200, self._blocking(sessions.index, lambda: [s.to_json() for s in sessions.sessions.values()])

    # ---- JSON shapes of Consul's responses ----------------------------------------------------

    def _node_json(self) -> dict:
        config = self.standin.config
        return {"ID": config.node_id, "Node": config.node_name, "Address": config.address,
                "Datacenter": config.datacenter, "TaggedAddresses": {"lan": config.address},
                "Meta": {}, "CreateIndex": 1, "ModifyIndex": 1}

    def _service_json(self, service) -> dict:
        return {"ID": service.service_id, "Service": service.name, "Tags": service.tags,
                "Address": service.address, "TaggedAddresses": {}, "Meta": service.meta,
                "Port": service.port, "Weights": service.weights, "EnableTagOverride": False,
                "CreateIndex": service.create_index, "ModifyIndex": service.modify_index}

    def _agent_service_json(self, service) -> dict:
        return {"ID": service.service_id, "Service": service.name, "Tags": service.tags,
                "Meta": service.meta, "Port": service.port, "Address": service.address,
                "Weights": service.weights, "EnableTagOverride": False,
                "Datacenter": self.standin.config.datacenter}

    def _check_json(self, check) -> dict:
        service = self.standin.catalog.services.get(check.service_id)
        return {"Node": self.standin.config.node_name, "CheckID": check.check_id, "Name": check.name,
                "Status": check.status, "Notes": check.notes, "Output": check.output,
                "ServiceID": check.service_id, "ServiceName": service.name if service else "",
                "ServiceTags": service.tags if service else [], "Type": check.kind,
                "Interval": check.definition.get("Interval", ""), "Timeout": check.definition.get("Timeout", ""),
                "Definition": {}, "CreateIndex": check.create_index, "ModifyIndex": check.modify_index}
