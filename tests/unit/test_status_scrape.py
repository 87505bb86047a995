"""`tensoryard status` scraping: real pages over HTTP, unreachable ones, and the options."""

from __future__ import annotations

import json
import socket

import prometheus_client
import pytest

from services.status.command import StatusOptions
from services.status.scrape import fetch_all


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page_url():
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("tensoryard:generation_tokens", "", ["model"], registry=registry).labels("m").inc(5)
    prometheus_client.Gauge("tensoryard:num_requests_waiting", "", registry=registry).set(2)
    prometheus_client.Histogram("tensoryard:time_to_first_token_seconds", "", registry=registry).observe(0.2)
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    thread.join(5)


def test_fetch_all_parses_live_pages_and_reports_unreachable_ones(page_url):
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    scrapes = fetch_all([page_url, dead, page_url], timeout_s=2)
    assert set(scrapes) == {page_url, dead}
    snapshot = scrapes[page_url].snapshot
    assert snapshot.samples["tensoryard:generation_tokens"] == [({"model": "m"}, 5.0)]
    assert snapshot.samples["tensoryard:num_requests_waiting"] == [({}, 2.0)]
    assert "tensoryard:time_to_first_token_seconds" in snapshot.families
    assert snapshot.taken_at_s > 0
    assert scrapes[dead].snapshot is None and "refused" in scrapes[dead].error.lower()


def test_router_metrics_given_win_over_ups_targets(tmp_path):
    write_router_targets(tmp_path, ["127.0.0.1:8002"])
    given = StatusOptions(router_metrics=("127.0.0.1:9100", "http://r2:9200/metrics"), home=tmp_path)
    assert given.router_urls() == ["http://127.0.0.1:9100/metrics", "http://r2:9200/metrics"]


def test_router_metrics_are_read_from_the_targets_up_keeps_in_its_home(tmp_path):
    write_router_targets(tmp_path, ["127.0.0.1:8002", "127.0.0.1:41234"])
    assert StatusOptions(home=tmp_path).router_urls() == [
        "http://127.0.0.1:8002/metrics", "http://127.0.0.1:41234/metrics"]


def test_router_metrics_default_to_ups_port_on_the_registry_host(tmp_path):
    assert StatusOptions(registry="10.0.0.5:7070", home=tmp_path).router_urls() == ["http://10.0.0.5:8002/metrics"]
    (tmp_path / "prometheus" / "targets").mkdir(parents=True)
    (tmp_path / "prometheus" / "targets" / "router.json").write_text("not json")
    assert StatusOptions(registry="10.0.0.5:7070", home=tmp_path).router_urls() == ["http://10.0.0.5:8002/metrics"]


def write_router_targets(home, addresses: list[str]) -> None:
    """As `tensoryard up` writes them (services/prometheus.py): Prometheus file_sd JSON."""
    directory = home / "prometheus" / "targets"
    directory.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": [address], "labels": {}} for address in addresses]
    (directory / "router.json").write_text(json.dumps(groups))


@pytest.mark.parametrize("field, value", [("interval_s", 0), ("timeout_s", -1)])
def test_options_refuse_non_positive_durations_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        StatusOptions(**{field: value})
