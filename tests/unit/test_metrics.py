"""Prometheus exposition and the families read at scrape time or observed off the engine thread.

Each test collects from a registry of its own; no test here imports the `inference` protos.
"""

from __future__ import annotations

import gzip
import time
import urllib.request
from types import SimpleNamespace

import grpc
import prometheus_client
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import render, serve_metrics, triton_counter
from services.router import metrics as router_metrics
from services.router.admission import InFlightLimiter
from services.router.load import ReplicaLoad
from services.worker.batcher import BatcherConfig, DynamicBatcher
from services.worker.engine.engine import (
    EngineStats,
    RequestOutput,
    RequestTimings,
    StepRecord,
    Usage,
)
from services.worker.gpu_metrics import NvmlCollector
from services.worker.llm_metrics import LLMMetrics, buckets_1_2_5
from services.worker.metrics import WorkerCollector
from services.worker.state import Phase, WorkerState
from services.worker.statistics import StatisticsRecorder


class Families:
    def __init__(self, *families):
        self.families = families

    def collect(self):
        return self.families


def registry_of(*collectors) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def samples(registry) -> dict[tuple[str, frozenset], float]:
    """(sample name as written, labels) -> value, parsed from the rendered text."""
    text = render(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        written_total = f"# TYPE {family.name}_total counter\n" in text
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and not written_total:
                name = family.name  # a suffixless counter: the parser adds _total
            out[(name, frozenset(sample.labels.items()))] = sample.value
    return out


# --- exposition -----------------------------------------------------------------------------------


def test_a_suffixless_counter_is_written_as_triton_writes_it_and_parses_as_a_counter():
    family = triton_counter("nv_inference_request_success", ("model", "version"))
    family.add_metric(("m", "1"), 7)
    text = render(Families(family)).decode()
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert 'nv_inference_request_success{model="m",version="1"} 7.0\n' in text
    assert "_total" not in text
    (parsed,) = text_string_to_metric_families(text)
    assert (parsed.name, parsed.type, parsed.samples[0].value) == ("nv_inference_request_success", "counter", 7.0)


def test_other_families_are_written_by_prometheus_client_unchanged():
    registry = CollectorRegistry()
    prometheus_client.Counter("tensoryard_things", "Things.", registry=registry).inc(2)
    text = render(registry).decode()
    assert "# TYPE tensoryard_things_total counter\n" in text and "tensoryard_things_total 2.0\n" in text


def test_label_values_are_escaped():
    family = triton_counter("nv_inference_count", ("model",))
    family.add_metric(('a "quoted"\\name',), 1)
    (parsed,) = text_string_to_metric_families(render(Families(family)).decode())
    assert parsed.samples[0].labels == {"model": 'a "quoted"\\name'}


def test_the_endpoint_serves_the_text_format_even_to_a_client_preferring_openmetrics():
    family = triton_counter("nv_inference_count", ("model",))
    family.add_metric(("m",), 3)
    port = serve_metrics(0, "127.0.0.1", Families(family))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5", "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert reply.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(reply.read()).decode()
    assert "# TYPE nv_inference_count counter\n" in text and "# EOF" not in text


def test_the_default_registry_keeps_the_process_collector():
    text = render(REGISTRY).decode()
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text


# --- the worker's scrape-time families ------------------------------------------------------------


def embedding_worker(batcher: DynamicBatcher, recorder: StatisticsRecorder) -> WorkerState:
    model = SimpleNamespace(name="minilm", version="3", batcher=batcher, statistics=recorder.snapshot,
                            weight_bytes=1234, reports_load=False, queue_depth=2)
    state = WorkerState(worker_id="w1", model_name="minilm", model=model)
    state.set_phase(Phase.SERVING)
    return state


def test_worker_triton_counters_and_batch_histogram_equal_the_recorder_snapshot():
    recorder = StatisticsRecorder()
    batcher = DynamicBatcher(BatcherConfig(max_batch_size=8), lambda payloads: payloads, statistics=recorder)
    try:
        for size in (1, 3, 3, 8):
            batcher.submit("x", size).result(5)
    finally:
        batcher.close(timeout_s=5)
    recorder.record_failure(2_000, "REJECTED")
    got = samples(registry_of(WorkerCollector(embedding_worker(batcher, recorder))))
    snapshot = recorder.snapshot()
    labels = {"model": "minilm", "version": "3", "worker": "w1"}

    def value(name: str, **extra) -> float:
        return got[(name, frozenset({**labels, **extra}.items()))]

    assert value("nv_inference_request_success") == snapshot.success.count == 4
    assert value("nv_inference_count") == snapshot.inference_count == 15
    assert value("nv_inference_exec_count") == snapshot.execution_count == 4
    assert value("nv_inference_request_duration_us") == snapshot.success.ns // 1000
    assert value("nv_inference_queue_duration_us") == snapshot.queue.ns // 1000
    assert value("nv_inference_compute_infer_duration_us") == snapshot.compute_infer.ns // 1000
    assert value("nv_inference_request_failure", reason="REJECTED") == 1
    assert value("nv_inference_request_failure", reason="BACKEND") == 0
    assert value("tensoryard_batcher_batch_size_count") == 4
    assert value("tensoryard_batcher_batch_size_sum") == 15
    buckets = {le: value("tensoryard_batcher_batch_size_bucket", le=le) for le in ("1.0", "2.0", "4.0", "8.0", "+Inf")}
    assert buckets == {"1.0": 1, "2.0": 1, "4.0": 3, "8.0": 4, "+Inf": 4}
    assert value("tensoryard_batcher_queue_size") == 0
    assert value("nv_inference_pending_request_count") == 2
    assert value("tensoryard_model_weight_bytes") == 1234


def test_worker_health_gauges_follow_the_phase():
    state = WorkerState(worker_id="w1", model_name="minilm")
    registry = registry_of(WorkerCollector(state))

    def phases() -> dict[str, float]:
        got = samples(registry)
        return {dict(labels)["phase"]: v for (name, labels), v in got.items() if name == "tensoryard_worker_phase"}

    assert phases() == {"loading": 1, "ready": 0, "stalled": 0, "draining": 0, "failed": 0}
    state.model = SimpleNamespace(name="minilm", version="3", statistics=StatisticsRecorder().snapshot,
                                  weight_bytes=0, reports_load=False, queue_depth=0)
    state.set_phase(Phase.SERVING)
    assert phases()["ready"] == 1 and sum(phases().values()) == 1
    assert samples(registry)[("tensoryard_worker_serving", frozenset({"model": "minilm", "worker": "w1"}.items()))] == 1
    state.set_phase(Phase.DRAINING)
    assert phases()["draining"] == 1
    assert samples(registry)[("tensoryard_worker_serving", frozenset({"model": "minilm", "worker": "w1"}.items()))] == 0


def test_engine_gauges_and_counters_come_from_the_latest_engine_stats():
    stats = EngineStats(num_running=3, num_waiting=2, num_used_blocks=25, num_free_blocks=75, num_total_blocks=100,
                        num_preemptions=4, num_chunked_prefills=0, num_prefix_query_tokens=640,
                        num_prefix_hit_tokens=320)
    loop = SimpleNamespace(stats=lambda: stats, last_progress_s=time.monotonic() - 2.0)
    model = SimpleNamespace(name="llm", version="1", statistics=StatisticsRecorder().snapshot, loop=loop,
                            weight_bytes=10, kv_cache_bytes=20, reports_load=True, queue_depth=2)
    got = samples(registry_of(WorkerCollector(WorkerState(worker_id="w2", model_name="llm", model=model))))
    labels = frozenset({"model": "llm", "version": "1", "worker": "w2"}.items())
    assert got[("tensoryard:num_requests_running", labels)] == 3
    assert got[("tensoryard:num_requests_waiting", labels)] == 2
    assert got[("tensoryard:kv_cache_usage_perc", labels)] == 0.25
    assert got[("tensoryard:prefix_cache_queries_total", labels)] == 640
    assert got[("tensoryard:prefix_cache_hits_total", labels)] == 320
    assert got[("tensoryard:num_preemptions_total", labels)] == 4
    assert got[("tensoryard_kv_cache_bytes", labels)] == 20
    assert time.time() - got[("tensoryard:engine_last_step_timestamp_seconds", labels)] == pytest.approx(2.0, abs=0.5)


def test_no_gpu_means_no_nvml_collector():
    assert NvmlCollector.create("cpu") is None


def test_nvml_collector_gives_dcgm_names_from_nvml_readings():
    nvml = SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlDeviceGetIndex=lambda h: 0, nvmlDeviceGetUUID=lambda h: "GPU-abc", nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=3 * 2**30, free=5 * 2**30, total=8 * 2**30),
        nvmlDeviceGetPowerUsage=lambda h: 312_500,
    )
    got = samples(Families(*NvmlCollector(nvml, ["handle"]).collect("w1")))
    labels = frozenset({"gpu": "0", "UUID": "GPU-abc", "device": "nvidia0", "modelName": "NVIDIA H200",
                        "worker": "w1"}.items())
    assert got[("DCGM_FI_DEV_GPU_UTIL", labels)] == 87
    assert (got[("DCGM_FI_DEV_FB_USED", labels)], got[("DCGM_FI_DEV_FB_FREE", labels)],
            got[("DCGM_FI_DEV_FB_TOTAL", labels)]) == (3072, 5120, 8192)
    assert got[("DCGM_FI_DEV_POWER_USAGE", labels)] == 312.5


# --- the LLM families, observed on the dispatcher thread ------------------------------------------


def finished_output(reason: str = "stop", prompt: int = 10, completion: int = 4, scheduled: bool = True):
    timings = RequestTimings(arrival_s=100.0, first_scheduled_s=100.5 if scheduled else None,
                             first_token_s=101.0 if scheduled else None, finished_s=103.0, num_preemptions=0)
    return RequestOutput("r", [], "", reason, Usage(prompt, completion, 0), timings=timings)


def test_a_finished_request_is_observed_in_every_request_histogram():
    registry = CollectorRegistry()
    metrics = LLMMetrics("llm", "1", "w1", max_model_len=2048, registry=registry)
    metrics.observe_finished(64, finished_output())
    metrics.observe_finished(64, finished_output("abort", prompt=7, completion=0, scheduled=False))
    got = samples(registry)
    labels = {"model": "llm", "version": "1", "worker": "w1"}

    def value(name: str, **extra) -> float:
        return got[("tensoryard:" + name, frozenset({**labels, **extra}.items()))]

    assert value("e2e_request_latency_seconds_count") == 2
    assert value("e2e_request_latency_seconds_sum") == 6.0
    assert value("request_queue_time_seconds_sum") == 0.5 + 3.0  # an unscheduled request queued to the end
    assert value("time_to_first_token_seconds_count") == 1  # the aborted one had no first token
    assert value("time_to_first_token_seconds_sum") == 1.0
    assert value("request_prefill_time_seconds_sum") == 0.5
    assert value("request_decode_time_seconds_sum") == 2.0
    assert value("request_inference_time_seconds_sum") == 2.5
    assert value("prompt_tokens_total") == 17
    assert value("request_generation_tokens_sum") == 4
    assert value("request_params_max_tokens_sum") == 128
    assert value("request_success_total", finished_reason="stop") == 1
    assert value("request_success_total", finished_reason="abort") == 1
    assert value("request_success_total", finished_reason="length") == 0


def test_a_step_is_observed_in_the_step_histograms_and_the_generation_counter():
    registry = CollectorRegistry()
    metrics = LLMMetrics("llm", "1", "w1", max_model_len=2048, registry=registry)
    metrics.observe_step(StepRecord(started_s=0.0, duration_s=0.03, num_seqs=3, num_tokens=130,
                                    num_prefill_tokens=128, num_sampled=3, num_preemptions=0,
                                    inter_token_latencies_s=(0.02, 0.04)))
    got = samples(registry)
    labels = frozenset({"model": "llm", "version": "1", "worker": "w1"}.items())
    assert got[("tensoryard:generation_tokens_total", labels)] == 3
    assert got[("tensoryard:iteration_tokens_total_sum", labels)] == 130
    assert got[("tensoryard:engine_step_duration_seconds_count", labels)] == 1
    assert got[("tensoryard:inter_token_latency_seconds_count", labels)] == 2
    assert got[("tensoryard:inter_token_latency_seconds_bucket", labels | {("le", "0.025")})] == 1


def test_a_bad_record_is_logged_not_raised_on_the_dispatcher_thread():
    metrics = LLMMetrics("llm", "1", "w1", max_model_len=2048, registry=CollectorRegistry())
    metrics.observe_finished(64, RequestOutput("r", [], "", "stop", Usage(1, 1, 0), timings=None))  # no raise


def test_token_buckets_are_vllms_1_2_5_series():
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(2048)[-1] == 2000


# --- the router ------------------------------------------------------------------------------------


def backend(instance_id: str = "w1", version: str = "2", load: ReplicaLoad | None = None):
    return SimpleNamespace(instance_id=instance_id, model_version=version, model_name="m", load=load or ReplicaLoad())


def router_samples(forwarded, limiter=None, backends=()):
    pool = SimpleNamespace(config=SimpleNamespace(stale_after_s=1.0), all_backends=lambda: list(backends))
    collector = router_metrics.RouterCollector(pool, limiter or InFlightLimiter(10), forwarded)
    return samples(registry_of(collector))


def test_forwarded_requests_count_by_replica_and_code_and_time_the_routers_share():
    forwarded = router_metrics.ForwardedRequests()
    with forwarded.track("m", "", num_items=3) as request:
        time.sleep(0.01)
        request.answered(backend(), upstream_s=0.005)
    with pytest.raises(RuntimeError), forwarded.track("m", ""):
        raise RuntimeError("boom")
    got = router_samples(forwarded)

    def value(name: str, **labels) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("tensoryard_router_requests_total", model="m", version="2", worker="w1", code="OK") == 1
    assert value("tensoryard_router_requests_total", model="m", version="", worker="", code="INTERNAL") == 1
    assert value("nv_inference_request_success", model="m", version="2") == 1
    assert value("nv_inference_count", model="m", version="2") == 3
    assert value("nv_inference_request_duration_us", model="m", version="2") >= 10_000
    assert value("nv_inference_request_failure", model="m", version="", reason="OTHER") == 1
    # Only the request that reached a replica has an added latency: 10 ms of wall time, 5 upstream.
    assert value("tensoryard_router_added_latency_seconds_count", model="m") == 1
    assert value("tensoryard_router_added_latency_seconds_sum", model="m") == pytest.approx(0.005, abs=0.004)
    assert value("tensoryard_router_added_latency_seconds_bucket", model="m", le="0.001") == 0
    assert value("tensoryard_router_added_latency_seconds_bucket", model="m", le="+Inf") == 1


def test_failure_codes_map_to_tritons_reasons_and_unknown_models_are_not_counted():
    forwarded = router_metrics.ForwardedRequests()
    cases = [("RESOURCE_EXHAUSTED", None), ("CANCELLED", backend()), ("UNAVAILABLE", backend()), ("UNAVAILABLE", None)]
    for code, answered_by in cases:
        request = forwarded.track("m", "2")
        if answered_by is not None:
            request.answered(answered_by, 0.0)
        forwarded.finish(request, grpc.StatusCode[code])
    forwarded.finish(forwarded.track("no-such-model", ""), grpc.StatusCode.NOT_FOUND)
    got = router_samples(forwarded)
    failures = {dict(labels)["reason"]: v for (name, labels), v in got.items() if name == "nv_inference_request_failure"}
    assert failures == {"REJECTED": 1, "CANCELED": 1, "BACKEND": 1, "OTHER": 1}
    assert not any(dict(labels).get("model") == "no-such-model" for _, labels in got)


def test_with_observation_off_nothing_is_tracked():
    forwarded = router_metrics.ForwardedRequests(enabled=False)
    with forwarded.track("m", "") as request:
        request.answered(backend(), 0.1)
    assert request is router_metrics.UNCOUNTED and forwarded.series == {}


def test_router_collector_reads_in_flight_and_replica_states():
    limiter = InFlightLimiter(10)
    limiter.acquire("m", "")
    now = time.monotonic()

    def load(state: str, reported_at_s: float) -> ReplicaLoad:
        return ReplicaLoad(stats=SimpleNamespace(state=state, queue_wait_bound_s=0.0), reported_at_s=reported_at_s)

    backends = [backend("a", load=load("SERVING", now)), backend("b", load=load("DRAINING", now)),
                backend("c", load=load("SERVING", now - 60))]
    got = router_samples(router_metrics.ForwardedRequests(), limiter, backends)
    assert got[("tensoryard_router_in_flight", frozenset({("model", "m")}))] == 1
    states = {dict(labels)["state"]: v for (name, labels), v in got.items() if name == "tensoryard_router_replicas"}
    assert states == {"ready": 1, "saturated": 0, "stale": 1, "draining": 1}
