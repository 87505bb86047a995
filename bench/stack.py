"""`tensoryard up` for a benchmark: a temporary home, free ports, SIGINT on the way out.

The stack runs in its own session, so a Ctrl-C at the terminal reaches the benchmark only, which
then stops the stack through its one shutdown path (SIGINT to the launcher). Its output and logs are
kept when something went wrong and removed otherwise.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console

from bench.machine import cpu_affinity

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0

log = Console(stderr=True)


@dataclass(frozen=True, slots=True)
class Stack:
    router: str
    registry: str
    home: Path
    process: subprocess.Popen


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so no two ports are the same
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def running_stack(worker_threads: int, server_cpus: set[int] | None, with_llm: bool = True,
                  home: Path | None = None):
    """`tensoryard up` in a temporary home; SIGINT on the way out, whatever happens.

    `with_llm=False` serves the embedding demo only. `home` may name a folder made for the purpose
    that already holds `imports/` (then `up` reuses the import instead of converting the GGUF again);
    it is handled like the temporary one: removed afterwards unless something went wrong.
    """
    home = home or Path(tempfile.mkdtemp(prefix="tensoryard-bench-"))
    ports = free_ports(4)
    output_path = home / "up.out"
    command = [sys.executable, "-m", "services.cli", "up", "--home", str(home),
               "--router-port", str(ports[0]), "--registry-port", str(ports[1]),
               "--router-metrics-port", str(ports[2]), "--registry-metrics-port", str(ports[3]),
               "--worker-threads", str(worker_threads), *([] if with_llm else ["--no-llm"])]
    with open(output_path, "ab") as output, cpu_affinity(server_cpus):
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    ok = False
    try:
        _wait_ready(process, output_path)
        yield Stack(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", home, process)
        ok = True
    finally:
        ok = _stop(process) and ok
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            log.print(f"[yellow]stack output and logs kept in {home}[/yellow]")


def _wait_ready(process: subprocess.Popen, output_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        output = output_path.read_text(errors="replace")
        if "tensoryard is ready" in output:
            return
        if process.poll() is not None:
            raise RuntimeError(f"tensoryard up exited with code {process.returncode}:\n{output[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"tensoryard up not ready after {READY_TIMEOUT_S:.0f}s; see {output_path}")


def _stop(process: subprocess.Popen) -> bool:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(STOP_TIMEOUT_S) == 0
    except subprocess.TimeoutExpired:
        log.print(f"[red]tensoryard up (pid {process.pid}) ignored SIGINT for {STOP_TIMEOUT_S:.0f}s; killed[/red]")
        process.kill()
        process.wait()
        return False


def worker_address(registry: str, model_name: str) -> str:
    from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc

    with grpc.insecure_channel(registry) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=model_name), timeout=5
        )
    if not reply.instances:
        raise RuntimeError(f"no worker for {model_name} in discovery at {registry}")
    return reply.instances[0].address
