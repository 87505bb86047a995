"""`tensoryard status` report: replicas merged into models, unreachable and missing pieces."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from services.status.report import build_report
from tests.unit.status_samples import EMBEDDER, LLM, round_of, router_page, worker, worker_page

REGISTRY = "127.0.0.1:7070"
A, B = worker("aaaaaaaa0001", EMBEDDER, 5000), worker("bbbbbbbb0002", EMBEDDER, 5010)
G = worker("cccccccc0003", LLM, 5020)


def model_of(report, name: str):
    return next(m for m in report.models if m.model == name)


def test_model_rates_are_the_sum_of_its_replicas():
    before = round_of({A: worker_page(EMBEDDER, 100), B: worker_page(EMBEDDER, 10)}, at_s=0.0)
    after = round_of({A: worker_page(EMBEDDER, 120, failures=2), B: worker_page(EMBEDDER, 30)}, at_s=2.0)
    model = model_of(build_report(REGISTRY, before, after), EMBEDDER)
    assert (model.num_replicas, model.num_ready_replicas) == (2, 2)
    assert [r.figures.requests_per_s for r in model.replicas] == pytest.approx([11.0, 10.0])
    assert model.figures.requests_per_s == pytest.approx(21.0)
    assert model.figures.errors_per_s == pytest.approx(1.0)


def test_model_percentiles_merge_the_replicas_buckets_before_the_quantile():
    # A: 99 requests under 5 ms in the window; B: 1 request in (0.5, 1] s.
    idle = worker_page(EMBEDDER, 0, latency=(0,) * 7)
    before = round_of({A: idle, B: idle}, 0.0)
    after = round_of({A: worker_page(EMBEDDER, 99, latency=(99,) * 7),
                      B: worker_page(EMBEDDER, 1, latency=(0, 0, 0, 0, 0, 1, 1))}, 1.0)
    model = model_of(build_report(REGISTRY, before, after), EMBEDDER)
    assert model.figures.latency_p50_s == pytest.approx(0.005 * 50 / 99)
    assert model.figures.latency_p99_s == pytest.approx(0.005)  # rank 99 of 100: still A's bucket
    assert model.replicas[1].figures.latency_p99_s == pytest.approx(0.5 + 0.5 * 0.99)


def test_llm_latency_is_read_from_the_e2e_histogram_and_ttft_tokens_queue_kv_from_theirs():
    before = round_of({G: worker_page(LLM, 0, latency=(0,) * 7, e2e=(0,) * 7, ttft=(0,) * 7, tokens=0)}, 0.0)
    after = round_of({G: worker_page(LLM, 4, latency=(4,) * 7, e2e=(0, 0, 0, 0, 4, 4, 4),
                                     ttft=(0, 4, 4, 4, 4, 4, 4), tokens=64, waiting=3, kv=0.4)}, 2.0)
    figures = model_of(build_report(REGISTRY, before, after), LLM).figures
    assert 0.1 < figures.latency_p50_s <= 0.5  # e2e's buckets, not the gRPC histogram's (< 5 ms)
    assert 0.005 < figures.ttft_p99_s <= 0.01
    assert figures.tokens_per_s == pytest.approx(32.0)
    assert (figures.num_requests_waiting, figures.kv_cache_usage_perc) == (3.0, 0.4)


def test_unreachable_replica_is_reported_as_such_and_the_model_keeps_the_others():
    before = round_of({A: worker_page(EMBEDDER, 0), B: worker_page(EMBEDDER, 0)}, 0.0)
    after = round_of({A: worker_page(EMBEDDER, 10), B: None}, 1.0)
    model = model_of(build_report(REGISTRY, before, after), EMBEDDER)
    down = model.replicas[1]
    assert (down.reachable, down.phase, down.serving) == (False, "unreachable", None)
    assert "refused" in down.error and down.figures.requests_per_s is None
    assert (model.num_replicas, model.num_ready_replicas) == (2, 1)
    assert model.figures.requests_per_s == pytest.approx(10.0)


def test_families_a_worker_does_not_export_are_none_not_zero():
    page = worker_page(EMBEDDER, 0, serving=None, phase=None)
    model = model_of(build_report(REGISTRY, round_of({A: page}, 0.0), round_of({A: page}, 1.0)), EMBEDDER)
    figures = model.figures
    assert figures.requests_per_s == 0.0
    assert None is figures.latency_p50_s is figures.ttft_p50_s is figures.tokens_per_s is figures.kv_cache_usage_perc
    assert model.num_ready_replicas is None and model.replicas[0].phase is None


def test_a_worker_new_in_the_second_round_has_its_gauges_but_no_rates_yet():
    report = build_report(REGISTRY, round_of({}, 0.0), round_of({G: worker_page(LLM, 50, waiting=2)}, 1.0))
    figures = model_of(report, LLM).figures
    assert figures.requests_per_s is None and figures.num_requests_waiting == 2.0


def test_routers_report_per_model_and_add_models_no_replica_serves():
    url = "http://127.0.0.1:8002/metrics"
    before = round_of({A: worker_page(EMBEDDER, 0)}, 0.0, routers={url: router_page((EMBEDDER, "1", 0, 0))})
    after = round_of({A: worker_page(EMBEDDER, 8)}, 2.0,
                     routers={url: router_page((EMBEDDER, "1", 8, 0), ("gone-model", "3", 0, 6))})
    report = build_report(REGISTRY, before, after)
    router = report.routers[0]
    assert router.reachable and router.requests_per_s == pytest.approx(7.0)
    assert [(m.model, m.requests_per_s, m.errors_per_s) for m in router.models] == [
        (EMBEDDER, pytest.approx(4.0), 0.0), ("gone-model", pytest.approx(3.0), pytest.approx(3.0))]
    gone = model_of(report, "gone-model")
    assert (gone.version, gone.num_replicas, gone.figures.requests_per_s) == ("3", 0, None)


def test_unreachable_router_and_registry_are_reported_not_raised():
    url = "http://127.0.0.1:8002/metrics"
    report = build_report(REGISTRY, None, round_of({}, 0.0, routers={url: None}, discovery_error="UNAVAILABLE"))
    assert report.discovery_error == "UNAVAILABLE" and report.models == []
    assert (report.routers[0].reachable, report.routers[0].requests_per_s) == (False, None)


def test_report_is_plain_json_with_versions_in_numeric_order():
    v2, v10 = worker("d1", EMBEDDER, 6000, version="2"), worker("d2", EMBEDDER, 6010, version="10")
    pages = {v10: worker_page(EMBEDDER, 0), v2: worker_page(EMBEDDER, 0)}
    report = build_report(REGISTRY, round_of(pages, 0.0), round_of(pages, 2.0))
    data = json.loads(json.dumps(asdict(report)))
    assert [m["version"] for m in data["models"]] == ["2", "10"]
    assert data["window_s"] == pytest.approx(2.0)
    assert set(data["models"][0]["figures"]) >= {"requests_per_s", "latency_p99_s", "ttft_p50_s", "tokens_per_s",
                                                  "num_requests_waiting", "kv_cache_usage_perc"}
    assert data["models"][0]["replicas"][0]["worker_id"] == "d1"


def test_latency_falls_back_to_the_grpc_histogram_when_e2e_saw_nothing_in_the_window():
    before = round_of({G: worker_page(LLM, 0, latency=(0,) * 7, e2e=(0,) * 7)}, 0.0)
    after = round_of({G: worker_page(LLM, 2, latency=(2,) * 7, e2e=(0,) * 7)}, 1.0)
    assert model_of(build_report(REGISTRY, before, after), LLM).figures.latency_p99_s <= 0.005
