"""Pytest fixtures that run the Consul stand-in as a real subprocess on a free loopback port.

    def test_x(consul_standin):          # a ConsulStandin handle; consul_standin.url is the base URL
        ...
    def test_y(consul_url):              # just the base URL, "http://127.0.0.1:PORT"
        ...

Outage tests use the handle: `stop()`, `start()`, or `restart(down_s=30)`, which brings the stand-in
back on the same port. A restarted stand-in has a FRESH state, like `consul agent -dev` (everything in
memory): services, checks, KV and sessions are gone and the index starts again low, so clients must
re-register and must reset a blocking query whose index went backwards, as Consul's documents ask.

Other knobs (ACL token, the test-speed minimums) go through `start_consul_standin(...)`, e.g.
`start_consul_standin("--acl-token", "s3cret", *FAST_TIMERS)`.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Test knobs, not Consul's values: reap critical services after DeregisterCriticalServiceAfter with no
# one-minute floor, every 100 ms instead of 30 s, and accept session TTLs from 1 s instead of 10 s.
FAST_TIMERS = ("--deregister-critical-min", "0s", "--reap-interval", "100ms", "--session-ttl-min", "1s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ConsulStandin:
    """One stand-in process; it can be stopped and started again on the same port."""

    def __init__(self, *args: str, port: int | None = None, log_path: Path | None = None):
        self.args = list(args)
        self.port = port or _free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 15) -> "ConsulStandin":
        if self.running:
            return self
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.consul_standin", "--port", str(self.port), *self.args],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(timeout_s)
        return self

    def stop(self, timeout_s: float = 10) -> None:
        if not self.running:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

    def restart(self, down_s: float = 0.0) -> "ConsulStandin":
        """Stop, stay down `down_s` seconds (an outage), start again on the same port, fresh state."""
        self.stop()
        time.sleep(down_s)
        return self.start()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"consul stand-in exited with {self.process.returncode}")
            try:
                # /v1/status/leader needs no ACL token in Consul either.
                with urllib.request.urlopen(f"{self.url}/v1/status/leader", timeout=1) as reply:
                    if json.loads(reply.read()):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"consul stand-in not ready on {self.url} after {timeout_s}s")


@pytest.fixture
def start_consul_standin(tmp_path):
    """A factory: start_consul_standin(*flags) -> a started ConsulStandin, stopped at teardown."""
    started: list[ConsulStandin] = []

    def start(*args: str, port: int | None = None) -> ConsulStandin:
        standin = ConsulStandin(*args, port=port, log_path=tmp_path / f"consul-standin-{len(started)}.log")
        started.append(standin)
        return standin.start()

    yield start
    for standin in started:
        standin.stop()


@pytest.fixture
def consul_standin(start_consul_standin) -> ConsulStandin:
    """A stand-in with Consul's own defaults (TTL minimums, lock-delay, reaper interval)."""
    return start_consul_standin()


@pytest.fixture
def consul_url(consul_standin) -> str:
    return consul_standin.url
