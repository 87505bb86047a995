"""`tensoryard up --prometheus`: one more supervised process, scraping what up started."""

from __future__ import annotations

import re
import socket

import pytest

from tests.conftest import free_port, start_up, stop, wait_until
from tests.deploy.prometheus_server import active_targets, api

pytestmark = pytest.mark.slow


def test_up_starts_prometheus_with_the_shipped_config_and_rules(prometheus_binary, tmp_path):
    port = free_port()
    up = start_up(tmp_path, "--no-llm", "--prometheus", "--prometheus-port", str(port))
    try:
        output = up.output_path.read_text()
        match = re.search(r"prometheus (http://\S+)", output)
        assert match and match.group(1) == f"http://127.0.0.1:{port}", output
        url = match.group(1)

        def all_scraped() -> bool:
            targets = active_targets(url)
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)

        wait_until(all_scraped, 30, "up's Prometheus to scrape registry, router and worker", interval_s=0.5)
        groups = {g["name"] for g in api(url, "rules")["groups"]}
        assert {"tensoryard-alerts", "tensoryard-front-door", "tensoryard-slo-availability"} <= groups
        assert (tmp_path / "prometheus" / "data").is_dir()
    finally:
        assert stop(up.process) == 0
    with socket.socket() as sock:  # stopped with the rest
        assert sock.connect_ex(("127.0.0.1", port)) != 0
