"""The router's own Prometheus series: how it routes, retries, migrates and refuses; what it forwarded."""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field

import grpc
import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from services.common.metrics import triton_counter
from services.router.load import DRAINING

FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")  # Triton's
REPLICA_STATES = ("ready", "saturated", "stale", "draining")

ROUTED = prometheus_client.Counter(
    "tensoryard_router_routed_total", "Requests routed to a replica, by model and policy.", ["model", "policy"]
)
RETRIES = prometheus_client.Counter(
    "tensoryard_router_retries_total", "Requests retried on another replica before anything was sent back.",
    ["model", "code"],
)
MIGRATIONS = prometheus_client.Counter(
    "tensoryard_router_migrations_total",
    "Generation streams continued on another replica after theirs went away, by why.", ["model", "reason"],
)
REJECTED = prometheus_client.Counter(
    "tensoryard_router_rejected_total", "Requests refused by the router, by reason.", ["model", "reason"]
)
HELD_SECONDS = prometheus_client.Histogram(
    "tensoryard_router_held_for_first_replica_seconds",
    "How long requests for a deployment scaled to zero waited for its first replica (cold_start.py).",
    ["model"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
PREFIX_MATCHED_BLOCKS = prometheus_client.Counter(
    "tensoryard_router_prefix_matched_blocks_total",
    "Prompt blocks the chosen replica was known to hold (kv_aware), and all prompt blocks routed.",
    ["model", "kind"],
)
KV_INDEX_MODE = prometheus_client.Gauge(
    "tensoryard_router_kv_index_events",
    "1 while a replica streams KV events to this router, 0 while its index is approximate (routed prompts).",
    ["worker"],
)

# Bucket bounds of tensoryard_router_added_latency_seconds.
ADDED_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Forwarded:
    """One inference request through the router, as a context manager around its handling: the
    replica that answered (the last one tried), the time spent in upstream calls, and on exit the
    final code, from the exception that ended it (a RelayError's or domain error's `code`)."""

    __slots__ = ("_requests", "backend", "model", "num_items", "started_s", "upstream_s", "version")

    def __init__(self, requests: ForwardedRequests, model: str, version: str, num_items: int):
        self._requests = requests
        self.model = model
        self.version = version
        self.num_items = num_items
        self.backend = None
        self.started_s = time.perf_counter()
        self.upstream_s = 0.0

    def answered(self, backend, upstream_s: float) -> None:
        """An upstream call to `backend` ended after upstream_s (Relay, after each attempt)."""
        self.backend = backend
        self.upstream_s += upstream_s

    def __enter__(self) -> Forwarded:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self._requests.finish(self, _code_of(error))
        return False


class _Uncounted:
    """Stands in for a Forwarded where nothing is counted: metadata and config calls, and every
    call while observation is off."""

    __slots__ = ()

    def answered(self, backend, upstream_s: float) -> None:
        pass

    def __enter__(self) -> _Uncounted:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        return False


UNCOUNTED = _Uncounted()


def _code_of(error: BaseException | None) -> grpc.StatusCode:
    if error is None:
        return grpc.StatusCode.OK
    code = getattr(error, "code", None)  # RelayError, TensoryardError
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the caller went away
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


@dataclass(slots=True)
class _Series:
    """Counts for one (model, version, worker): requests by code, and Triton's counters."""

    num_ok: int = 0
    num_by_code: dict[grpc.StatusCode, int] = field(default_factory=dict)  # the codes other than OK
    success_ns: int = 0
    num_items: int = 0  # inferences in the successful requests
    num_failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))


@dataclass(slots=True)
class _Histogram:
    """Observations in buckets, for one model; rendered cumulative at scrape time."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(ADDED_LATENCY_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(ADDED_LATENCY_BUCKETS_S, value_s)] += 1
        self.sum_s += value_s


class ForwardedRequests:
    """Counts every inference request the router handled, for `tensoryard_router_requests_total`,
    `tensoryard_router_added_latency_seconds` and Triton's success / failure / count / request
    duration per model and version, which RouterCollector renders at scrape time.

    Plain integers, not prometheus-client objects: everything here runs on the router's one event
    loop, and a labelled Counter.inc plus a Histogram.observe took about 9 us a request (two locks
    each, an exemplar check, a Python loop over the buckets) where all of this takes 3.5 (timeit,
    on the shared 2-core box; the whole hop costs about 660 us of router CPU). With
    `enabled` False (--metrics-port -1) nothing is tracked."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.series: dict[tuple[str, str, str], _Series] = {}
        self.added_latency: dict[str, _Histogram] = {}

    def track(self, model: str, version: str, num_items: int = 1) -> Forwarded | _Uncounted:
        """The request's record, to hand the relay and exit when it ends (`with`)."""
        return Forwarded(self, model, version, num_items) if self.enabled else UNCOUNTED

    def finish(self, request: Forwarded, code: grpc.StatusCode) -> None:
        if code is grpc.StatusCode.NOT_FOUND:
            return  # no such model: a label value per misspelt name would be unbounded
        elapsed_s = time.perf_counter() - request.started_s
        backend = request.backend
        if backend is None:
            key = (request.model, request.version, "")
        else:
            key = (request.model, backend.model_version, backend.instance_id)
            histogram = self.added_latency.get(request.model)
            if histogram is None:
                histogram = self.added_latency[request.model] = _Histogram()
            histogram.observe(max(elapsed_s - request.upstream_s, 0.0))
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series()
        if code is grpc.StatusCode.OK:
            series.num_ok += 1
            series.success_ns += int(elapsed_s * 1e9)
            series.num_items += request.num_items
        else:
            series.num_by_code[code] = series.num_by_code.get(code, 0) + 1
            series.num_failed[_failure_reason(code, backend)] += 1


def _failure_reason(code: grpc.StatusCode, backend) -> str:
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "REJECTED"
    if code is grpc.StatusCode.CANCELLED:
        return "CANCELED"
    return "BACKEND" if backend is not None else "OTHER"


class RouterCollector:
    """Scrape-time families: requests forwarded and the router's added latency (ForwardedRequests),
    requests in flight (the admission limiter's counts), replicas by state (the pool), and Triton's
    counters of what was forwarded. Read from the metrics thread: copies made in one C call of
    counts the event loop updates."""

    def __init__(self, pool, limiter, forwarded: ForwardedRequests):
        self._pool = pool
        self._limiter = limiter
        self._forwarded = forwarded

    def describe(self):
        return []  # families come and go with the models; nothing to reserve at registration

    def collect(self):
        series = sorted(self._forwarded.series.items())
        yield self._requests(series)
        yield self._added_latency()
        in_flight = GaugeMetricFamily("tensoryard_router_in_flight", "Requests in flight through this router.",
                                      labels=("model",))
        for model, count in sorted(self._limiter.in_flight_by_model().items()):
            in_flight.add_metric((model,), count)
        yield in_flight
        replicas = GaugeMetricFamily("tensoryard_router_replicas", "Replicas known to this router, by state.",
                                     labels=("model", "state"))
        for model, states in sorted(self._replica_states().items()):
            for state, count in states.items():
                replicas.add_metric((model, state), count)
        yield replicas
        yield from self._triton(series)

    @staticmethod
    def _requests(series) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "tensoryard_router_requests",
            "Inference requests through the router, by the replica that answered (\"\" when none did) and final code.",
            labels=("model", "version", "worker", "code"))
        for (model, version, worker), counts in series:
            if counts.num_ok:
                family.add_metric((model, version, worker, "OK"), counts.num_ok)
            for code, count in list(counts.num_by_code.items()):
                family.add_metric((model, version, worker, code.name), count)
        return family

    def _added_latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "tensoryard_router_added_latency_seconds",
            "The router's own share of a request's time: its wall time less the upstream calls' "
            "(requests that reached a replica).", labels=("model",))
        for model, histogram in sorted(self._forwarded.added_latency.items()):
            counts = list(histogram.counts)
            buckets, cumulative = [], 0
            for bound, count in zip((*ADDED_LATENCY_BUCKETS_S, float("inf")), counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric((model,), buckets, sum_value=histogram.sum_s)
        return family

    def _replica_states(self) -> dict[str, dict[str, int]]:
        now = time.monotonic()
        stale_after_s = self._pool.config.stale_after_s
        by_model: dict[str, dict[str, int]] = {}
        for backend in self._pool.all_backends():
            states = by_model.setdefault(backend.model_name, dict.fromkeys(REPLICA_STATES, 0))
            states[replica_state(backend.load, now, stale_after_s)] += 1
        return by_model

    @staticmethod
    def _triton(series):
        """Per (model, version): the sums over the replicas that answered."""
        by_version: dict[tuple[str, str], list] = {}
        for (model, version, _), counts in series:
            total = by_version.setdefault((model, version), [0, 0, 0, dict.fromkeys(FAILURE_REASONS, 0)])
            total[0] += counts.num_ok
            total[1] += counts.num_items
            total[2] += counts.success_ns
            for reason, count in list(counts.num_failed.items()):
                total[3][reason] += count
        labels = ("model", "version")
        success = triton_counter("nv_inference_request_success", labels)
        failure = triton_counter("nv_inference_request_failure", (*labels, "reason"))
        count = triton_counter("nv_inference_count", labels)
        duration = triton_counter("nv_inference_request_duration_us", labels)
        for key, (num_ok, num_items, success_ns, num_failed) in sorted(by_version.items()):
            success.add_metric(key, num_ok)
            count.add_metric(key, num_items)
            duration.add_metric(key, success_ns // 1000)
            for reason, num in num_failed.items():
                failure.add_metric((*key, reason), num)
        yield from (success, failure, count, duration)


def replica_state(load, now_s: float, stale_after_s: float) -> str:
    """draining (it said so), stale (not taking requests: silent, stalled, loading), saturated
    (routable, but its own estimate says it would refuse), else ready."""
    if load.state == DRAINING:
        return "draining"
    if not load.routable(now_s, stale_after_s):
        return "stale"
    return "saturated" if load.saturated else "ready"
