"""`tensoryard up` and Prometheus: the scrape targets up keeps, and the Prometheus it can start.

Targets. `up` chooses every process's metrics port itself (workers' too: a free port when first
started, kept across restarts) and writes them as file_sd JSON, one file per job, under
`<home>/prometheus/targets/` (`registry.json`, `router.json`, `worker.json`). A target therefore
stays put while its process restarts, and a worker that died or hangs shows as `up == 0` instead
of a target that silently vanished (which discovery-driven targets would do once its lease
expires). Files are replaced atomically: Prometheus re-reads one when it changes and must never
see half of it. Worker targets carry a `model` label, so families without one (`process_*`,
`DCGM_*`, `up`) can be filtered by model; the shipped config scrapes workers with `honor_labels`,
so a worker's own `model` label (the same value) is kept as it is.

Config. `<home>/prometheus/` also gets a copy of the shipped `deploy/prometheus/prometheus.yml`
and `rules/`, whose relative paths then point at those targets: `prometheus
--config.file=<home>/prometheus/prometheus.yml` scrapes a running `up` from anywhere, and
`up --prometheus` starts exactly that.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.telemetry import free_port

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
# Roles up starts, and the scrape job (deploy/prometheus/prometheus.yml) each one's targets feed.
TARGET_FILES = {"registry": "registry.json", "router": "router.json", "worker": "worker.json"}
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    name: str  # the supervised process, e.g. "worker-all-MiniLM-L6-v2-0"
    role: str  # a key of TARGET_FILES
    address: str  # host:metrics_port
    labels: Mapping[str, str] = field(default_factory=dict)


class ScrapeTargets:
    """The file_sd files of one `up`, rewritten whenever a target is added or all are cleared."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._targets: dict[str, ScrapeTarget] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for role in TARGET_FILES:  # a file per job from the start, so none is ever missing
            self._write(role)

    def add(self, target: ScrapeTarget) -> None:
        if target.role not in TARGET_FILES:
            raise ValueError(f"role must be one of {sorted(TARGET_FILES)}, not {target.role!r}")
        self._targets[target.name] = target
        self._write(target.role)

    def remove(self, name: str) -> None:
        """`name` is gone on purpose (a worker undeployed): not a target that is down."""
        target = self._targets.pop(name, None)
        if target is not None:
            self._write(target.role)

    def clear(self) -> None:
        """No targets: `up` stopped on purpose, so nothing it ran should count as down."""
        self._targets.clear()
        for role in TARGET_FILES:
            self._write(role)

    def _write(self, role: str) -> None:
        groups = [
            {"targets": [t.address], "labels": dict(t.labels)}
            for t in sorted(self._targets.values(), key=lambda t: t.name)
            if t.role == role
        ]
        path = self.directory / TARGET_FILES[role]
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(groups, indent=2) + "\n")
        os.replace(partial, path)


def prepare_config(directory: Path, shipped: Path = SHIPPED_DIR) -> Path | None:
    """Copy the shipped prometheus.yml and rules/ into `directory`; returns the config's path, or
    None where they are not shipped (an install without the repository's deploy/ folder)."""
    if not (shipped / "prometheus.yml").is_file():
        return None
    rules = directory / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    for old in rules.glob("*.yml"):  # a rule file removed from deploy/ must not linger here
        old.unlink()
    for rule_file in sorted((shipped / "rules").glob("*.yml")):
        shutil.copyfile(rule_file, rules / rule_file.name)
    config = directory / "prometheus.yml"
    shutil.copyfile(shipped / "prometheus.yml", config)
    return config


def find_binary(search_path: str | None) -> str | None:
    """The `prometheus` executable on `search_path` (a PATH value), or None."""
    return shutil.which("prometheus", path=search_path)


class CannotStart(Exception):
    """Why `up --prometheus` starts no Prometheus (it goes on without one)."""


@dataclass(frozen=True, slots=True)
class Launch:
    argv: tuple[str, ...]
    url: str
    data_dir: Path
    note: str = ""  # e.g. that the port asked for was in use


def plan_launch(binary: str | None, config: Path | None, directory: Path, host: str, port: int) -> Launch:
    """How to run Prometheus with `config`, data in `directory`/data, on `port` (0, or a port in
    use: a free one); CannotStart when there is no binary or no config."""
    if binary is None:
        raise CannotStart("no `prometheus` binary on PATH (Debian/Ubuntu: apt-get install prometheus)")
    if config is None:
        raise CannotStart(f"no shipped configuration at {SHIPPED_DIR}")
    note = ""
    if port == 0:
        port = free_port(host)
    elif not port_is_free(host, port):
        free = free_port(host)
        note, port = f"port {port} is in use; using {free}", free
    data_dir = directory / "data"
    argv = (
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",  # POST /-/reload after editing the rules
    )
    return Launch(argv, f"http://{host}:{port}", data_dir, note)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_ready(url: str, still_running, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Until `<url>/-/ready` answers 200 (True), the process ends or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and still_running():
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False
