"""What `tensoryard status` shows, built from two rounds of scrapes (pure: no I/O here).

Per replica (a worker discovery lists) the figures come from its own page; per model and version
they are the replicas' merged: rates and queues summed, histogram buckets summed before the
percentile is taken (so a model's p99 is that of all its requests, not an average of p99s), KV
use averaged. A worker serves one model version, so its families are read whole, without a label
filter. Routers are reported apart (what they forwarded and refused), since with `up --routers N`
only the first router's metrics port is known and their sum would undercount.

Sources, all from docs/METRICS.md:
- requests/s, errors/s: `nv_inference_request_success` + `_failure`, `_failure` alone;
- latency p50/p99: `tensoryard:e2e_request_latency_seconds` where the worker observed some in the
  window (LLM), else the worker's `tensoryard_grpc_request_duration_seconds` of its inference
  methods (the same requests, timed by the gRPC server: one model per worker, so per model);
- TTFT p50/p99: `tensoryard:time_to_first_token_seconds`; tokens/s: `tensoryard:generation_tokens`;
- queue: `tensoryard:num_requests_waiting` + `tensoryard_batcher_queue_size`; running:
  `tensoryard:num_requests_running`; KV use: `tensoryard:kv_cache_usage_perc` (0..1);
- ready: `tensoryard_worker_serving`; phase: the `tensoryard_worker_phase` series set to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.status import figures as f
from services.status.scrape import Round, Snapshot, WorkerInstance

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
E2E_LATENCY = "tensoryard:e2e_request_latency_seconds"
GRPC_LATENCY = "tensoryard_grpc_request_duration_seconds"
INFERENCE_METHODS = ("ModelInfer", "ModelStreamInfer", "Embed", "Generate")
TTFT = "tensoryard:time_to_first_token_seconds"
GENERATION_TOKENS = "tensoryard:generation_tokens"
WAITING = "tensoryard:num_requests_waiting"
BATCHER_QUEUE = "tensoryard_batcher_queue_size"
RUNNING = "tensoryard:num_requests_running"
KV_USAGE = "tensoryard:kv_cache_usage_perc"
SERVING = "tensoryard_worker_serving"
PHASE = "tensoryard_worker_phase"
ROUTER_IN_FLIGHT = "tensoryard_router_in_flight"
ROUTER_REJECTED = "tensoryard_router_rejected"


@dataclass(slots=True)
class Figures:
    """None: not known (family absent, page unreachable, or no observation in the window)."""

    requests_per_s: float | None = None
    errors_per_s: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tokens_per_s: float | None = None
    num_requests_waiting: float | None = None
    num_requests_running: float | None = None
    kv_cache_usage_perc: float | None = None  # 0..1, as the family


@dataclass(slots=True)
class ReplicaStatus:
    worker_id: str
    address: str
    metrics_url: str | None
    reachable: bool
    error: str | None
    phase: str | None  # the worker's phase label; None when it does not export one
    serving: bool | None
    figures: Figures


@dataclass(slots=True)
class ModelStatus:
    model: str
    version: str
    num_replicas: int
    num_ready_replicas: int | None  # None when no replica exports tensoryard_worker_serving
    figures: Figures
    replicas: list[ReplicaStatus] = field(default_factory=list)


@dataclass(slots=True)
class RouterModel:
    model: str
    version: str
    requests_per_s: float | None
    errors_per_s: float | None


@dataclass(slots=True)
class RouterStatus:
    metrics_url: str
    reachable: bool
    error: str | None
    requests_per_s: float | None
    errors_per_s: float | None
    rejected_per_s: float | None
    num_in_flight: float | None
    models: list[RouterModel] = field(default_factory=list)


@dataclass(slots=True)
class StatusReport:
    registry: str
    discovery_error: str | None
    window_s: float | None  # between the two rounds; None before the second
    taken_at_unix_s: float
    models: list[ModelStatus]
    routers: list[RouterStatus]


@dataclass(slots=True)
class _Window:
    """One replica's raw figures over the window, kept mergeable (buckets, not percentiles)."""

    requests_per_s: float | None = None
    errors_per_s: float | None = None
    tokens_per_s: float | None = None
    latency: f.Buckets | None = None
    ttft: f.Buckets | None = None
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None

    @classmethod
    def of(cls, before: Snapshot | None, after: Snapshot | None) -> _Window:
        if after is None:
            return cls()
        window = cls(
            waiting=_sum_known([f.gauge_sum(after, WAITING), f.gauge_sum(after, BATCHER_QUEUE)]),
            running=f.gauge_sum(after, RUNNING),
            kv_usage=f.gauge_mean(after, KV_USAGE),
        )
        if before is None:
            return window
        successes = f.counter_rate(before, after, SUCCESS)
        window.errors_per_s = f.counter_rate(before, after, FAILURE)
        window.requests_per_s = _sum_known([successes, window.errors_per_s])
        window.tokens_per_s = f.counter_rate(before, after, GENERATION_TOKENS)
        window.latency = f.histogram_delta(before, after, E2E_LATENCY)
        if not window.latency or not window.latency.get(math.inf):  # not an LLM, or none finished
            window.latency = f.histogram_delta(before, after, GRPC_LATENCY,
                                               f.labels_match(grpc_method=INFERENCE_METHODS))
        window.ttft = f.histogram_delta(before, after, TTFT)
        return window

    @classmethod
    def merge(cls, windows: list[_Window]) -> _Window:
        return cls(
            requests_per_s=_sum_known([w.requests_per_s for w in windows]),
            errors_per_s=_sum_known([w.errors_per_s for w in windows]),
            tokens_per_s=_sum_known([w.tokens_per_s for w in windows]),
            latency=f.merge_buckets(w.latency for w in windows),
            ttft=f.merge_buckets(w.ttft for w in windows),
            waiting=_sum_known([w.waiting for w in windows]),
            running=_sum_known([w.running for w in windows]),
            kv_usage=_mean_known([w.kv_usage for w in windows]),
        )

    def figures(self) -> Figures:
        return Figures(
            requests_per_s=self.requests_per_s,
            errors_per_s=self.errors_per_s,
            latency_p50_s=f.quantile(0.5, self.latency),
            latency_p99_s=f.quantile(0.99, self.latency),
            ttft_p50_s=f.quantile(0.5, self.ttft),
            ttft_p99_s=f.quantile(0.99, self.ttft),
            tokens_per_s=self.tokens_per_s,
            num_requests_waiting=self.waiting,
            num_requests_running=self.running,
            kv_cache_usage_perc=self.kv_usage,
        )


def build_report(registry: str, before: Round | None, after: Round) -> StatusReport:
    models: dict[tuple[str, str], ModelStatus] = {}
    windows: dict[tuple[str, str], list[_Window]] = {}
    for worker in after.workers:
        replica, window = _replica(worker, before, after)
        key = (worker.model, worker.version)
        models.setdefault(key, ModelStatus(worker.model, worker.version, 0, None, Figures())).replicas.append(replica)
        windows.setdefault(key, []).append(window)
    routers = [_router(url, before, after) for url in after.router_urls]
    for router in routers:  # models a router forwarded to (or refused) with no replica listed
        for seen in (m for m in router.models if m.model):
            models.setdefault((seen.model, seen.version), ModelStatus(seen.model, seen.version, 0, None, Figures()))
    for key, model in models.items():
        model.replicas.sort(key=lambda r: r.worker_id)
        model.num_replicas = len(model.replicas)
        serving = [r.serving for r in model.replicas if r.serving is not None]
        model.num_ready_replicas = sum(serving) if serving else None
        model.figures = _Window.merge(windows.get(key, [])).figures()
    return StatusReport(
        registry=registry,
        discovery_error=after.discovery_error,
        window_s=after.taken_at_unix_s - before.taken_at_unix_s if before is not None else None,
        taken_at_unix_s=after.taken_at_unix_s,
        models=[models[key] for key in sorted(models, key=_model_order)],
        routers=routers,
    )


def _replica(worker: WorkerInstance, before: Round | None, after: Round) -> tuple[ReplicaStatus, _Window]:
    url = worker.metrics_url
    scrape = after.scrapes.get(url) if url else None
    snapshot = scrape.snapshot if scrape else None
    earlier = before.scrapes.get(url) if before is not None and url else None
    window = _Window.of(earlier.snapshot if earlier else None, snapshot)
    if url is None:
        error = "publishes no metrics_port"
    elif snapshot is None:
        error = scrape.error if scrape else "not scraped"
    else:
        error = None
    serving = f.gauge_sum(snapshot, SERVING) if snapshot is not None else None
    replica = ReplicaStatus(
        worker_id=worker.worker_id,
        address=worker.address,
        metrics_url=url,
        reachable=snapshot is not None,
        error=error,
        phase=(f.gauge_label(snapshot, PHASE, "phase") if snapshot is not None else "unreachable"),
        serving=None if serving is None else serving >= 1,
        figures=window.figures(),
    )
    return replica, window


def _router(url: str, before: Round | None, after: Round) -> RouterStatus:
    scrape = after.scrapes.get(url)
    snapshot = scrape.snapshot if scrape else None
    earlier = before.scrapes.get(url) if before is not None else None
    previous = earlier.snapshot if earlier else None
    status = RouterStatus(url, snapshot is not None, scrape.error if scrape else "not scraped",
                          None, None, None, None)
    if snapshot is None:
        return status
    status.num_in_flight = f.gauge_sum(snapshot, ROUTER_IN_FLIGHT)
    if previous is None:
        return status
    status.errors_per_s = f.counter_rate(previous, snapshot, FAILURE)
    status.requests_per_s = _sum_known([f.counter_rate(previous, snapshot, SUCCESS), status.errors_per_s])
    status.rejected_per_s = f.counter_rate(previous, snapshot, ROUTER_REJECTED)
    pairs = {(labels.get("model", ""), labels.get("version", ""))
             for name in (SUCCESS, FAILURE) for labels, _ in snapshot.samples.get(name, ())}
    for model, version in sorted(pairs, key=_model_order):
        select = f.labels_match(model=model, version=version)
        errors = f.counter_rate(previous, snapshot, FAILURE, select)
        successes = f.counter_rate(previous, snapshot, SUCCESS, select)
        status.models.append(RouterModel(model, version, _sum_known([successes, errors]), errors))
    return status


def _sum_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _mean_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _model_order(key: tuple[str, str]) -> tuple:
    model, version = key
    return (model, 0, int(version), "") if version.isdigit() else (model, 1, 0, version)
