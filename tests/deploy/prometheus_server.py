"""A real Prometheus for the tests: where its binaries are, a config pointing at a running `up`,
the process, and the HTTP API calls the tests make."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Self

import yaml

from tests.conftest import free_port, wait_until
from tests.deploy.expressions import PROMETHEUS_DIR, RULES_DIR

NOT_INSTALLED = (
    "{name} is not installed: Debian's `prometheus` package provides it (./scripts/setup installs it "
    "when it runs as root where apt-get is)"
)


def binary(name: str) -> str | None:
    """`prometheus` or `promtool` on PATH, else Debian's install location."""
    found = shutil.which(name)
    if found is None and Path(f"/usr/bin/{name}").is_file():
        found = f"/usr/bin/{name}"
    return found


def config_for(targets_dir: Path, interval: str = "1s") -> dict:
    """The shipped prometheus.yml with absolute paths (targets of one `up`, the repository's
    rules) and a short scrape and evaluation interval."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    for job in config["scrape_configs"]:
        for sd in job["file_sd_configs"]:
            sd["files"] = [str(targets_dir / Path(f).name) for f in sd["files"]]
    return config


class Prometheus:
    """One Prometheus process on a free loopback port, stopped by `stop` (or leaving `with`)."""

    def __init__(self, binary_path: str, config: dict, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = directory / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary_path, f"--config.file={self.config_path}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self._ready, 30, f"Prometheus to be ready (log {self.log_path})", interval_s=0.2)
        except AssertionError:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"Prometheus exited: {self.log_path.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params) -> dict | list:
        return api(self.url, path, **params)

    def query(self, expr: str) -> list[dict]:
        """An instant query's samples; AssertionError naming the expression if Prometheus refuses it."""
        return query(self.url, expr)


def api(url: str, path: str, **params) -> dict | list:
    """GET <url>/api/v1/<path>; returns "data", raises AssertionError with Prometheus' error."""
    encoded = urllib.parse.urlencode([(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])])
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{encoded}", timeout=10) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read() or b"{}")
    assert body.get("status") == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]


def query(url: str, expr: str) -> list[dict]:
    return api(url, "query", query=expr, time=f"{time.time():.3f}")["result"]


def active_targets(url: str) -> list[dict]:
    return api(url, "targets", state="active")["activeTargets"]
