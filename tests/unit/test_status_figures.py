"""`tensoryard status` figures: rates and windowed percentiles from two hand-written pages."""

from __future__ import annotations

import math
import textwrap

import pytest

from services.status import figures as f
from services.status.scrape import metrics_url, parse


def page(text: str, at_s: float):
    return parse(textwrap.dedent(text), at_s)


def counter(name: str, *series: tuple[str, float]) -> str:
    lines = [f"# TYPE {name} counter"] + [f"{name}{labels} {value}" for labels, value in series]
    return "\n".join(lines) + "\n"


def histogram(name: str, buckets: dict[str, float], labels: str = "", declare: bool = True) -> str:
    """Cumulative `buckets` by le; labels inside the braces, e.g. 'grpc_method="Embed",'."""
    lines = [f"# TYPE {name} histogram"] if declare else []
    lines += [f'{name}_bucket{{{labels}le="{le}"}} {count}' for le, count in buckets.items()]
    lines.append(f"{name}_count{{{labels.rstrip(',')}}} {buckets['+Inf']}")
    lines.append(f"{name}_sum{{{labels.rstrip(',')}}} 0")
    return "\n".join(lines) + "\n"


def test_counter_rate_is_growth_over_the_window():
    before = page(counter("tensoryard:generation_tokens_total", ("", 100)), at_s=10.0)
    after = page(counter("tensoryard:generation_tokens_total", ("", 150)), at_s=12.0)
    assert f.counter_rate(before, after, "tensoryard:generation_tokens_total") == pytest.approx(25.0)
    assert f.counter_rate(before, after, "tensoryard:generation_tokens") == pytest.approx(25.0)


def test_counter_rate_reads_triton_counters_exposed_without_total_suffix():
    before = page(counter("nv_inference_request_success", ('{model="m",version="1"}', 3)), at_s=0.0)
    after = page(counter("nv_inference_request_success", ('{model="m",version="1"}', 13)), at_s=2.0)
    assert f.counter_rate(before, after, "nv_inference_request_success") == pytest.approx(5.0)


def test_counter_rate_sums_series_and_counts_a_new_series_from_zero():
    before = page(counter("nv_inference_request_failure", ('{reason="REJECTED"}', 4)), at_s=0.0)
    after = page(counter("nv_inference_request_failure", ('{reason="REJECTED"}', 6), ('{reason="BACKEND"}', 2)),
                 at_s=1.0)
    assert f.counter_rate(before, after, "nv_inference_request_failure") == pytest.approx(4.0)


def test_counter_that_went_down_was_reset_and_counts_from_zero():
    before = page(counter("nv_inference_request_success", ("", 500)), at_s=0.0)
    after = page(counter("nv_inference_request_success", ("", 7)), at_s=1.0)
    assert f.counter_rate(before, after, "nv_inference_request_success") == pytest.approx(7.0)


def test_absent_family_is_none_but_a_declared_one_without_samples_is_zero():
    empty = page("# HELP nv_inference_request_failure failed\n# TYPE nv_inference_request_failure counter\n", 0.0)
    later = page("# TYPE nv_inference_request_failure counter\n", 1.0)
    assert f.counter_rate(empty, later, "nv_inference_request_failure") == 0.0
    assert f.counter_rate(empty, later, "tensoryard:generation_tokens") is None
    assert f.gauge_sum(later, "tensoryard:kv_cache_usage_perc") is None
    assert f.gauge_mean(later, "tensoryard:kv_cache_usage_perc") is None
    assert f.histogram_delta(empty, later, "tensoryard:time_to_first_token_seconds") is None
    assert f.quantile(0.5, None) is None


def test_counter_rate_of_an_empty_window_is_none():
    same = page(counter("nv_inference_request_success", ("", 1)), at_s=5.0)
    assert f.counter_rate(same, same, "nv_inference_request_success") is None


def test_quantile_interpolates_linearly_within_the_bucket():
    # 100 observations: 20 in (0, 0.1], 60 in (0.1, 0.2], 20 in (0.2, 0.4].
    buckets = {0.1: 20, 0.2: 80, 0.4: 100, math.inf: 100}
    assert f.quantile(0.5, buckets) == pytest.approx(0.1 + 0.1 * (50 - 20) / 60)
    assert f.quantile(0.99, buckets) == pytest.approx(0.2 + 0.2 * (99 - 80) / 20)
    assert f.quantile(0.1, buckets) == pytest.approx(0.05)  # the first bucket starts at 0


def test_quantile_in_the_inf_bucket_answers_the_highest_finite_bound():
    assert f.quantile(0.99, {0.1: 10, 1.0: 50, math.inf: 100}) == 1.0


def test_quantile_without_observations_is_none():
    assert f.quantile(0.5, {0.1: 0, math.inf: 0}) is None
    assert f.quantile(0.5, {}) is None


def test_percentiles_come_from_the_window_only_not_from_earlier_observations():
    ttft = "tensoryard:time_to_first_token_seconds"
    # Before the window: 1000 slow requests (in (0.5, 1]); in it: 10 fast ones (in (0, 0.05]).
    before = page(histogram(ttft, {"0.05": 0, "0.5": 0, "1.0": 1000, "+Inf": 1000}), at_s=0.0)
    after = page(histogram(ttft, {"0.05": 10, "0.5": 10, "1.0": 1010, "+Inf": 1010}), at_s=2.0)
    window = f.histogram_delta(before, after, ttft)
    assert window == {0.05: 10, 0.5: 10, 1.0: 10, math.inf: 10}
    assert f.quantile(0.99, window) == pytest.approx(0.0495)


def test_histogram_reset_counts_the_buckets_from_zero():
    name = "tensoryard:e2e_request_latency_seconds"
    before = page(histogram(name, {"0.1": 100, "+Inf": 100}), at_s=0.0)
    after = page(histogram(name, {"0.1": 1, "+Inf": 3}), at_s=1.0)
    assert f.histogram_delta(before, after, name) == {0.1: 1, math.inf: 3}


def test_histogram_delta_sums_the_selected_series_only():
    name = "tensoryard_grpc_request_duration_seconds"
    text = (histogram(name, {"0.01": 4, "+Inf": 4}, 'grpc_method="Embed",')
            + histogram(name, {"0.01": 2, "+Inf": 6}, 'grpc_method="ModelInfer",', declare=False)
            + histogram(name, {"0.01": 90, "+Inf": 90}, 'grpc_method="Check",', declare=False))
    before = page(f"# TYPE {name} histogram\n", at_s=0.0)
    after = page(text, at_s=1.0)
    inference = f.labels_match(grpc_method=("Embed", "ModelInfer"))
    assert f.histogram_delta(before, after, name, inference) == {0.01: 6, math.inf: 10}


def test_merge_buckets_adds_by_bound_and_skips_unknown_parts():
    assert f.merge_buckets([{0.1: 1, math.inf: 2}, None, {0.1: 3, math.inf: 3}]) == {0.1: 4, math.inf: 5}
    assert f.merge_buckets([None, None]) is None


def test_labels_match_lets_samples_without_the_label_through():
    select = f.labels_match(model="m", version="1")
    assert select({"model": "m", "version": "1"})
    assert select({"grpc_method": "Embed"})
    assert not select({"model": "m", "version": "2"})


def test_gauges_sum_average_and_name_the_hot_phase():
    text = """\
        # TYPE tensoryard_worker_phase gauge
        tensoryard_worker_phase{phase="loading"} 0
        tensoryard_worker_phase{phase="ready"} 1
        # TYPE tensoryard:kv_cache_usage_perc gauge
        tensoryard:kv_cache_usage_perc{worker="a"} 0.25
        tensoryard:kv_cache_usage_perc{worker="b"} 0.75
        """
    snapshot = page(text, 0.0)
    assert f.gauge_label(snapshot, "tensoryard_worker_phase", "phase") == "ready"
    assert f.gauge_mean(snapshot, "tensoryard:kv_cache_usage_perc") == pytest.approx(0.5)
    assert f.gauge_sum(snapshot, "tensoryard:kv_cache_usage_perc") == pytest.approx(1.0)


@pytest.mark.parametrize("given, url", [
    ("127.0.0.1:8002", "http://127.0.0.1:8002/metrics"),
    ("http://router:9000", "http://router:9000/metrics"),
    ("http://router:9000/custom", "http://router:9000/custom"),
])
def test_metrics_url_accepts_host_port_or_url(given, url):
    assert metrics_url(given) == url
