"""A Consul stand-in for tests: the parts of Consul's HTTP API that tensoryard uses, on loopback.

    python -m tests.support.consul_standin --port 8500 [--acl-token TOKEN]

The Consul binary cannot be installed where tensoryard's tests run. tensoryard's Consul client is
written against Consul's documented HTTP API (developer.hashicorp.com/consul/api-docs), and this
server follows the same documents so the client can be tested for real: agent service and check
registration with TTL/gRPC/TCP/HTTP checks (consul_state.py, consul_probes.py), health and catalog
queries, KV with cas and session locks, sessions (consul_kv.py), /v1/status/leader and
/v1/agent/self, all served by consul_http.py. It behaves like one `consul agent -dev`: a server and agent in one, all state in
memory, so a restarted stand-in starts empty with a low index, as a restarted dev agent does.

Blocking queries: endpoints that block return X-Consul-Index (never 0) and, given `?index=N`, hang
until their index passes N or `wait` runs out (default 5 m, at most 10 m, plus up to wait/16 of
random jitter, as documented). An index above the current one (a client that kept its index across
a restart) blocks for the whole wait and then returns the lower index: the documented cue for a
client to reset.

ACL: with --acl-token every endpoint but /v1/status/* wants that token (X-Consul-Token,
Authorization: Bearer, or ?token=): an unknown token gets 403 "ACL not found", no token (the
anonymous token, with default policy deny) 403 "Permission denied".

Test knobs (Consul's values by default): --deregister-critical-min, --reap-interval,
--session-ttl-min.

Not supported, with a clear 400: ?filter expressions, script/Docker/alias checks, GRPCUseTLS.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from http.server import ThreadingHTTPServer

from tests.support.consul_http import Handler
from tests.support.consul_kv import KVStore, Sessions
from tests.support.consul_probes import Prober
from tests.support.consul_state import AgentConfig, Catalog, ConsulError, IndexClock, parse_duration_s

TICK_S = 0.02  # how often TTLs and session timers are aged: the lateness of an expiry, at most


class ConsulStandin:
    """The state behind one stand-in: catalog, KV, sessions, probes, and the thread that ages them."""

    def __init__(self, config: AgentConfig, acl_token: str | None = None, session_ttl_min_s: float = 10.0):
        self.config = config
        self.acl_token = acl_token
        self.clock = IndexClock()
        self.catalog = Catalog(self.clock, config)
        self.kv = KVStore(self.clock)
        self.sessions = Sessions(self.clock, self.catalog, self.kv, session_ttl_min_s)
        self.kv.sessions = self.sessions
        self.prober = Prober(self.catalog.set_status)
        self.catalog.start_probe, self.catalog.stop_probe = self.prober.start, self.prober.stop
        self._stopped = threading.Event()
        threading.Thread(target=self._age, name="consul-ticker", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _age(self) -> None:
        while not self._stopped.wait(TICK_S):
            now = time.monotonic()
            self.catalog.tick(now)
            self.sessions.tick(now)


def make_server(host: str, port: int, standin: ConsulStandin) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"standin": standin})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--acl-token", default=None, help="the one token accepted (none: ACLs off)")
    parser.add_argument("--node-name", default="standin")
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--deregister-critical-min", default="1m",
                        help="test knob: floor of DeregisterCriticalServiceAfter (Consul's: 1m)")
    parser.add_argument("--reap-interval", default="30s",
                        help="test knob: how often critical services are reaped (Consul's: 30s)")
    parser.add_argument("--session-ttl-min", default="10s", help="test knob: lowest session TTL (Consul's: 10s)")
    args = parser.parse_args(argv)
    try:
        config = AgentConfig(
            node_name=args.node_name, datacenter=args.datacenter,
            address="127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host,
            deregister_critical_min_s=parse_duration_s(args.deregister_critical_min, "--deregister-critical-min"),
            reap_interval_s=parse_duration_s(args.reap_interval, "--reap-interval"),
        )
        session_ttl_min_s = parse_duration_s(args.session_ttl_min, "--session-ttl-min")
    except ConsulError as error:
        parser.error(error.message)
    standin = ConsulStandin(config, args.acl_token, session_ttl_min_s)
    server = make_server(args.host, args.port, standin)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"consul stand-in listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        standin.stop()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
