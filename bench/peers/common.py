"""What every peer launcher shares: its cache folder and venv, readiness, one stop path, a smoke chat.

Standard library only, so a launcher runs under any Python 3.11. A peer's venv lives at
`<peers root>/<name>/venv` (root: `$TENSORYARD_PEERS_DIR`, else `~/.cache/tensoryard/peers`) and is
marked installed by `<peers root>/<name>/installed.json` once every install step has succeeded, so a
failed or interrupted install starts over instead of serving from a half-built venv.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOKE_PROMPT = "What is the capital of France?"
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5


def peers_root() -> Path:
    return Path(os.environ.get("TENSORYARD_PEERS_DIR", Path.home() / ".cache" / "tensoryard" / "peers"))


@dataclass(frozen=True, slots=True)
class PeerVenv:
    """One peer's folder: its venv, install marker and server log."""

    name: str
    root: Path = field(default_factory=peers_root)

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def venv(self) -> Path:
        return self.folder / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.folder / "installed.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def installed(self, steps: Sequence[Sequence[str]]) -> bool:
        """True when the marker records exactly these install steps (so a changed pin reinstalls)."""
        if not (self.marker.exists() and self.python.exists()):
            return False
        return json.loads(self.marker.read_text()).get("steps") == [list(step) for step in steps]

    def install(self, steps: Sequence[Sequence[str]], env: dict[str, str] | None = None,
                after: Callable[[PeerVenv], None] | None = None) -> None:
        """A fresh venv, then each step as one `pip install` (in order), then `after(self)`.

        Separate steps matter: the CPU torch wheel must be installed before anything that depends on
        torch, or pip resolves a CUDA build from the package index.
        """
        started_s = time.monotonic()
        if self.venv.exists():
            shutil.rmtree(self.venv)
        self.marker.unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        say(f"{self.name}: creating {self.venv}")
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        self.pip("install", "--upgrade", "pip", env=env)
        for step in steps:
            say(f"{self.name}: pip install {' '.join(step)}")
            self.pip("install", *step, env=env)
        if after is not None:
            after(self)
        install_s = time.monotonic() - started_s
        size_bytes = folder_size_bytes(self.venv)
        self.marker.write_text(json.dumps({"steps": [list(step) for step in steps],
                                           "install_s": round(install_s, 1),
                                           "venv_size_bytes": size_bytes}, indent=2) + "\n")
        say(f"{self.name}: installed in {install_s:.0f} s; venv {size_bytes / 2**30:.2f} GiB")

    def pip(self, *args: str, env: dict[str, str] | None = None) -> None:
        subprocess.run([str(self.python), "-m", "pip", *args], check=True, env={**os.environ, **(env or {})})


def folder_size_bytes(folder: Path) -> int:
    return sum(path.lstat().st_size for path in folder.rglob("*") if not path.is_symlink() and path.is_file())


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--install", action="store_true", help="install (or reinstall) the venv, then exit")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--cpus", default="", help="pin the server to these CPUs, e.g. '0' or '0,1'")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--smoke", action="store_true",
                        help="start, send one streaming chat completion, print the answer, stop")


def parse_cpus(text: str) -> set[int] | None:
    return {int(part) for part in text.split(",") if part.strip()} or None


class Stop(Exception):
    """SIGINT or SIGTERM reached the launcher."""


@contextlib.contextmanager
def stop_on_signals():
    """Turns the first SIGINT/SIGTERM into `Stop`, so every exit runs the same `finally`.

    Later signals are ignored: a second Ctrl-C must not cut the server's shutdown short.
    """
    raised = False

    def handler(signum, _frame):
        nonlocal raised
        if not raised:
            raised = True
            raise Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(slots=True)
class PeerServer:
    """A peer's OpenAI-compatible server process, started in its own session."""

    name: str
    command: list[str]
    base_url: str  # http://host:port, without /v1
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cpus: set[int] | None = None
    process: subprocess.Popen | None = None

    def start(self) -> None:
        # Its own session: a Ctrl-C at the terminal reaches the launcher only, which then stops the
        # server through `stop()`; the server's workers share its process group for the last resort.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # one run per log
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)

    def wait_ready(self, model: str, timeout_s: float) -> float:
        """Seconds until GET /v1/models lists `model`; raises if the server exits or time runs out."""
        started_s = time.monotonic()
        while time.monotonic() - started_s < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it was ready; "
                                   f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")
            if model in self.models():
                return time.monotonic() - started_s
            time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"{self.name} was not ready after {timeout_s:.0f} s; see {self.log_path}")

    def models(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as response:
                return [entry["id"] for entry in json.load(response).get("data", [])]
        except (OSError, ValueError, KeyError, urllib.error.URLError, http.client.HTTPException):
            return []

    def stop(self) -> int | None:
        """SIGINT (each server's graceful path), then SIGKILL to the whole group after a timeout."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"{self.name}: no exit {STOP_TIMEOUT_S:.0f} s after SIGINT; killing its process group")
        # Leftover workers (engine core, OpenMP helpers) would hold the port and the cores.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return self.process.returncode


def log_tail(path: Path, num_lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return ""


def stream_chat(base_url: str, model: str, prompt: str = SMOKE_PROMPT, max_tokens: int = 16) -> tuple[str, float]:
    """One streaming chat completion at temperature 0: (answer, seconds to the first token)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True}
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started_s = time.monotonic()
    first_token_s = None
    pieces = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:  # server-sent events: "data: {...}" lines, then "data: [DONE]"
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data:"):]).get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text and first_token_s is None:
                    first_token_s = time.monotonic() - started_s
                pieces.append(text)
    return "".join(pieces), first_token_s or 0.0


def run_server(server: PeerServer, model: str, ready_timeout_s: float, smoke: bool) -> int:
    """Start, wait until ready, print the ready line; then serve until a signal, or run the smoke chat."""
    with stop_on_signals():
        try:
            server.start()
            say(f"{server.name}: starting (pid {server.process.pid}); log {server.log_path}")
            ready_s = server.wait_ready(model, ready_timeout_s)
            print(f"{server.name} ready: {server.base_url}/v1 model={model} pid={server.process.pid} "
                  f"ready_s={ready_s:.1f}", flush=True)
            if smoke:
                answer, first_token_s = stream_chat(server.base_url, model)
                print(f"{server.name} smoke: {SMOKE_PROMPT!r} -> {answer!r} "
                      f"(first token {first_token_s:.2f} s)", flush=True)
                if not answer:  # e.g. the server died mid-stream; its log says why
                    say(f"{server.name}: empty answer; last lines of {server.log_path}:\n{log_tail(server.log_path)}")
                return 0 if answer else 1
            returncode = server.process.wait()
            say(f"{server.name}: exited on its own with {returncode}; last lines of {server.log_path}:\n"
                f"{log_tail(server.log_path)}")
            return returncode or 1
        except Stop as stop:
            say(f"{server.name}: {stop}, stopping")
            return 0
        finally:
            returncode = server.stop()
            say(f"{server.name}: stopped (exit {returncode})")
