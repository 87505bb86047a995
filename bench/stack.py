"""`tensoryard up` for a benchmark: a temporary home, free ports, SIGINT on the way out.

The stack runs in its own session, so a Ctrl-C at the terminal reaches the benchmark only, which
then stops the stack through its one shutdown path (SIGINT to the launcher). Its output and logs are
kept when something went wrong and removed otherwise.
"""

from __future__ import annotations

import contextlib
import os
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
def background_server(name: str, command: list[str], workdir: Path, ready_line: str,
                      server_cpus: set[int] | None, stop_timeout_s: float = STOP_TIMEOUT_S, env: dict | None = None):
    """A server process in its own session, its output in `workdir`; yields a `wait_ready()`.

    The caller waits when it suits it (two servers may start side by side). On the way out it gets
    SIGINT, then its whole process group SIGKILL if it ignores that; `workdir` is removed unless
    something went wrong, and then kept for a look.
    """
    output_path = workdir / "server.out"
    with open(output_path, "ab") as output, cpu_affinity(server_cpus):
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env=None if env is None else {**os.environ, **env})
    ok = False
    try:
        yield process, lambda: _wait_ready(name, process, output_path, ready_line)
        ok = True
    finally:
        ok = _stop(name, process, stop_timeout_s) and ok
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log.print(f"[yellow]{name} output kept in {workdir}[/yellow]")


@contextlib.contextmanager
def running_stack(worker_threads: int, server_cpus: set[int] | None, with_llm: bool = True,
                  home: Path | None = None, flags: tuple[str, ...] = (), env: dict | None = None):
    """`tensoryard up` in a temporary home; SIGINT on the way out, whatever happens.

    `with_llm=False` serves the embedding demo only. `home` may name a folder made for the purpose
    that already holds `imports/` (then `up` reuses the import instead of converting the GGUF again);
    it is handled like the temporary one: removed afterwards unless something went wrong. `flags`
    go to `up` after the ports; `env` is added to this process's environment for it.
    """
    home = home or Path(tempfile.mkdtemp(prefix="tensoryard-bench-"))
    ports = free_ports(4)
    command = [sys.executable, "-m", "services.cli", "up", "--home", str(home),
               "--router-port", str(ports[0]), "--registry-port", str(ports[1]),
               "--router-metrics-port", str(ports[2]), "--registry-metrics-port", str(ports[3]),
               "--worker-threads", str(worker_threads), *([] if with_llm else ["--no-llm"]), *flags]
    with background_server("tensoryard up", command, home, "tensoryard is ready", server_cpus,
                           env=env) as (process, wait_ready):
        wait_ready()
        yield Stack(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", home, process)


def _wait_ready(name: str, process: subprocess.Popen, output_path: Path, ready_line: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        output = output_path.read_text(errors="replace")
        if ready_line in output:
            return
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{output[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f}s; see {output_path}")


def _stop(name: str, process: subprocess.Popen, timeout_s: float) -> bool:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout_s) == 0
    except subprocess.TimeoutExpired:
        log.print(f"[red]{name} (pid {process.pid}) ignored SIGINT for {timeout_s:.0f}s; "
                  f"killed its process group[/red]")
        os.killpg(process.pid, signal.SIGKILL)
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
