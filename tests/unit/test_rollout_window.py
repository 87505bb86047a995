"""Router metrics pages -> per-version counts over a sliding window."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from services.common.metrics import triton_counter
from services.rollout.decision import VersionCounts
from services.rollout.window import CountsWindow, version_counts
from services.status.scrape import parse

MODEL = "m"


def page(ok: dict[str, int], failed: dict[str, dict[str, int]] | None = None) -> str:
    """A router page as the router renders it: OK counts per version (over two workers), failures
    by code, and Triton's success and duration counters (1 ms a request)."""

    class Families:
        def collect(self):
            requests = CounterMetricFamily("tensoryard_router_requests", "", labels=("model", "version", "worker", "code"))
            success = triton_counter("nv_inference_request_success", ("model", "version"))
            duration = triton_counter("nv_inference_request_duration_us", ("model", "version"))
            for version, count in ok.items():
                requests.add_metric((MODEL, version, "a", "OK"), count // 2)
                requests.add_metric((MODEL, version, "b", "OK"), count - count // 2)
                success.add_metric((MODEL, version), count)
                duration.add_metric((MODEL, version), count * 1000)
            for version, codes in (failed or {}).items():
                for code, count in codes.items():
                    requests.add_metric((MODEL, version, "a", code), count)
            yield from (requests, success, duration)

    registry = CollectorRegistry()
    registry.register(Families())
    return generate_latest(registry).decode()


def test_sums_workers_and_counts_only_real_errors():
    counts = version_counts(parse(page({"1": 10}, {"1": {"INTERNAL": 3, "RESOURCE_EXHAUSTED": 4, "CANCELLED": 1}})))
    assert counts[(MODEL, "1")] == VersionCounts(18, 3, 10, 10_000.0)


def test_first_page_of_a_router_is_a_baseline():
    window = CountsWindow()
    window.observe("r1", version_counts(parse(page({"1": 500}))), now_s=0.0)
    assert window.totals((MODEL, "1"), 30, now_s=0.0) == VersionCounts()


def test_keeps_the_increase_of_each_scrape():
    window = CountsWindow()
    window.observe("r1", version_counts(parse(page({"1": 500}))), now_s=0.0)
    window.observe("r1", version_counts(parse(page({"1": 520}))), now_s=1.0)
    window.observe("r1", version_counts(parse(page({"1": 530}))), now_s=2.0)
    assert window.totals((MODEL, "1"), 30, now_s=2.0).num_requests == 30


def test_a_new_series_on_a_known_router_counts_from_zero():
    window = CountsWindow()
    window.observe("r1", version_counts(parse(page({"1": 500}))), now_s=0.0)
    window.observe("r1", version_counts(parse(page({"1": 500, "2": 7}))), now_s=1.0)
    assert window.totals((MODEL, "2"), 30, now_s=1.0).num_requests == 7


def test_adds_up_several_routers():
    window = CountsWindow()
    for source in ("r1", "r2"):
        window.observe(source, version_counts(parse(page({"1": 100}))), now_s=0.0)
        window.observe(source, version_counts(parse(page({"1": 110}))), now_s=1.0)
    assert window.totals((MODEL, "1"), 30, now_s=1.0).num_requests == 20


def test_a_router_restart_counts_its_new_value():
    window = CountsWindow()
    window.observe("r1", version_counts(parse(page({"1": 500}))), now_s=0.0)
    window.observe("r1", version_counts(parse(page({"1": 4}))), now_s=1.0)
    assert window.totals((MODEL, "1"), 30, now_s=1.0).num_requests == 4


def test_increases_older_than_the_window_drop_out():
    window = CountsWindow()
    window.observe("r1", version_counts(parse(page({"1": 0}))), now_s=0.0)
    window.observe("r1", version_counts(parse(page({"1": 50}))), now_s=1.0)
    window.observe("r1", version_counts(parse(page({"1": 60}))), now_s=40.0)
    assert window.totals((MODEL, "1"), 30, now_s=40.0).num_requests == 10


def test_a_forgotten_router_gives_a_baseline_again():
    window = CountsWindow()
    window.observe("r1", version_counts(parse(page({"1": 10}))), now_s=0.0)
    window.forget("r1")
    window.observe("r1", version_counts(parse(page({"1": 900}))), now_s=1.0)
    assert window.totals((MODEL, "1"), 30, now_s=1.0).num_requests == 0
