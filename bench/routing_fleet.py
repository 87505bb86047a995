"""The fleet bench/bench_routing.py drives, started by hand: a registry, LLM workers and routers.

Every process is `python -m services.cli <role>` in its own session (a Ctrl-C at the terminal
reaches the benchmark only), logging JSON lines to a file in the fleet's home. Workers are started
together (they take 15-20 s to load on a small box, most of it in parallel) and restarted between
policy runs, so that every policy starts from empty prefix caches; a router is started for the run
it serves and stopped after it, so no idle router takes CPU from the measured one.

A router is ready for a run once it has a load report from every current worker (its
`tensoryard_router_kv_index_events{worker=...}` series exists: it is set on a worker's first report)
and has loaded the model's tokenizer (its `router_tokenizer_loaded` log line): before that,
kv_aware would route by load alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from bench.stack import REPO_ROOT, free_ports

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1

log = Console(stderr=True)


@dataclass(slots=True)
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    address: str = ""
    metrics_port: int = 0
    instance_id: str = ""  # workers: their id in discovery

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; its log "
                               f"{self.log_path} ends:\n{self.output()[-2000:]}")


@dataclass(slots=True)
class Fleet:
    """Owns every process it starts; `close()` stops them (workers, then routers, then registry)."""

    home: Path
    model_name: str
    worker_env: dict[str, str]
    num_threads: int = 1
    registry: Process | None = None
    workers: list[Process] = field(default_factory=list)
    routers: list[Process] = field(default_factory=list)
    num_worker_starts: int = 0
    worker_start_s: list[float] = field(default_factory=list)  # wall time of each (parallel) start

    # -- processes -------------------------------------------------------------------------------

    def _spawn(self, name: str, role: str, *flags: str, env: dict[str, str] | None = None) -> Process:
        log_path = self.home / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as output:
            popen = subprocess.Popen(
                [sys.executable, "-m", "services.cli", role, *flags], cwd=REPO_ROOT, stdout=output,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "TENSORYARD_LOG_FORMAT": "json", **(env or {})},
            )
        return Process(name, popen, log_path)

    def start_registry(self) -> str:
        (port,) = free_ports(1)
        self.registry = self._spawn("registry", "registry", "--port", str(port), "--data-dir",
                                    str(self.home / "registry"), "--metrics-port", "-1")
        self.registry.address = f"127.0.0.1:{port}"
        _wait(lambda: health_serving(self.registry.address), f"the registry at {self.registry.address}",
              [self.registry])
        return self.registry.address

    def register_model(self, folder: Path, config: dict) -> int:
        from services.registry.client import register_folder

        with grpc.insecure_channel(self.registry.address) as channel:
            version, _ = register_folder(channel, self.model_name, "generation", folder, config,
                                         "bench_routing: SmolLM2 sized for the routing scenarios")
        return version.version

    def start_workers(self, count: int) -> list[Process]:
        """`count` workers started at once; returns when each serves and is listed in discovery."""
        started_at = time.monotonic()
        ports = free_ports(count)
        self.num_worker_starts += 1
        workers = [
            self._spawn(f"worker-{self.num_worker_starts}-{index}", "worker", "--model-name", self.model_name,
                        "--registry", self.registry.address, "--port", str(port), "--num-threads",
                        str(self.num_threads), "--cache-dir", str(self.home / "worker-cache"),
                        "--metrics-port", "-1", env=self.worker_env)
            for index, port in enumerate(ports)
        ]
        for worker, port in zip(workers, ports):
            worker.address = f"127.0.0.1:{port}"
        self.workers = workers

        def listed() -> bool:
            ids = discovered_workers(self.registry.address, self.model_name)
            for worker in workers:
                worker.instance_id = ids.get(worker.address, "")
            return all(w.instance_id for w in workers) and len(ids) == len(workers)

        _wait(listed, f"{count} workers of {self.model_name} in discovery", workers)
        self.worker_start_s.append(time.monotonic() - started_at)
        return workers

    def stop_workers(self) -> None:
        """SIGTERM (drain: they deregister first), all at once, then wait."""
        stop_all(self.workers, signal.SIGTERM)
        self.workers = []

    def restart_workers(self, count: int) -> list[Process]:
        self.stop_workers()
        return self.start_workers(count)

    def start_router(self, name: str, flags: list[str], port: int | None = None) -> Process:
        """A router with these flags (several may share `port`: SO_REUSEPORT); ready once it follows
        discovery."""
        port = port or free_ports(1)[0]
        (metrics_port,) = free_ports(1)
        router = self._spawn(name, "router", "--port", str(port), "--registry", self.registry.address,
                             "--metrics-port", str(metrics_port), *flags)
        router.address, router.metrics_port = f"127.0.0.1:{port}", metrics_port
        self.routers.append(router)
        _wait(lambda: _metrics(router.metrics_port) is not None, f"router {name}'s metrics", [router])
        return router

    def wait_router_sees_workers(self, router: Process) -> None:
        """Until the router has a load report from every current worker and the model's tokenizer."""
        def ready() -> bool:
            text = _metrics(router.metrics_port) or ""
            reported = all(f'tensoryard_router_kv_index_events{{worker="{w.instance_id}"}}' in text
                           for w in self.workers)
            return reported and "router_tokenizer_loaded" in router.output()

        _wait(ready, f"router {router.name} to follow the {len(self.workers)} workers", [router, *self.workers])

    def stop_router(self, router: Process) -> None:
        stop_all([router], signal.SIGTERM)
        self.routers.remove(router)

    def close(self) -> None:
        stop_all(self.workers, signal.SIGTERM)
        stop_all(self.routers, signal.SIGTERM)
        stop_all([self.registry] if self.registry else [], signal.SIGINT)
        self.workers, self.routers, self.registry = [], [], None


@contextlib.contextmanager
def running_fleet(home: Path, model_name: str, worker_env: dict[str, str], num_threads: int = 1):
    """A Fleet in `home`, whose processes are stopped on the way out; `home` is removed when all went
    well and kept (with its logs) otherwise."""
    fleet = Fleet(home, model_name, worker_env, num_threads)
    ok = False
    try:
        yield fleet
        ok = True
    finally:
        fleet.close()
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            log.print(f"[yellow]fleet home and logs kept in {home}[/yellow]")


def stop_all(processes: list[Process], sig: signal.Signals) -> None:
    """The signal to each at once, then wait; a process group that ignores it is killed."""
    for process in processes:
        if process.popen.poll() is None:
            process.popen.send_signal(sig)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.print(f"[red]{process.name} (pid {process.pid}) ignored {sig.name}; killed its process group[/red]")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.popen.wait()


# ----------------------------------------------------------------------------------------- probes

def health_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def discovered_workers(registry: str, model_name: str) -> dict[str, str]:
    """address -> instance id of the model's workers listed in discovery."""
    from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc

    with grpc.insecure_channel(registry) as channel:
        try:
            reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
                discovery_pb2.ListRequest(service="worker", model_name=model_name), timeout=2)
        except grpc.RpcError:
            return {}
    return {i.address: i.instance_id for i in reply.instances}


def _metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            return response.read().decode()
    except OSError:
        return None


def _wait(predicate, what: str, processes: list[Process]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in processes:
            process.check_alive()
        if predicate():
            return
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"timed out after {READY_TIMEOUT_S:.0f}s waiting for {what}")

