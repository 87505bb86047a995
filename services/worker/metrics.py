"""The worker's families read at scrape time: nothing here runs while a request is served.

- Triton's `nv_inference_*` (counters without `_total`, as Triton writes them) from the model's
  `StatisticsRecorder`, the very snapshot the `ModelStatistics` RPC answers with;
- the dynamic batcher's batch-size histogram (from the recorder's per-size batch counts, so its
  sum is the items executed) and its queue;
- the LLM engine's gauges and own counters (running, waiting, KV use, prefix cache, preemptions,
  last step) from the latest EngineStats its loop published;
- health, phase and memory of the worker; NVML's device gauges where a GPU is used
  (`gpu_metrics.py`).

Labels: `model`, `version` and `worker` (the instance id in discovery); health and phase carry
`model` and `worker` only, since the version is not known while loading.
"""

from __future__ import annotations

import time

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from services.common.metrics import triton_counter
from services.worker.state import Phase, WorkerState
from services.worker.statistics import ModelStats

LABELS = ("model", "version", "worker")
# Phase -> the `phase` label's value (docs/METRICS.md).
PHASES = {Phase.LOADING: "loading", Phase.SERVING: "ready", Phase.STALLED: "stalled",
          Phase.DRAINING: "draining", Phase.FAILED: "failed"}
_US = 1_000  # ns per microsecond

# Triton's counters: ModelStats -> value, durations in microseconds.
_TRITON_VALUES = {
    "nv_inference_request_success": lambda s: s.success.count,
    "nv_inference_count": lambda s: s.inference_count,
    "nv_inference_exec_count": lambda s: s.execution_count,
    "nv_inference_request_duration_us": lambda s: s.success.ns // _US,
    "nv_inference_queue_duration_us": lambda s: s.queue.ns // _US,
    "nv_inference_compute_input_duration_us": lambda s: s.compute_input.ns // _US,
    "nv_inference_compute_infer_duration_us": lambda s: s.compute_infer.ns // _US,
    "nv_inference_compute_output_duration_us": lambda s: s.compute_output.ns // _US,
}


def triton_families(stats: ModelStats, label_values: tuple[str, ...]):
    """Triton's nv_inference_* counters of one model's snapshot."""
    for name, value in _TRITON_VALUES.items():
        family = triton_counter(name, LABELS)
        family.add_metric(label_values, value(stats))
        yield family
    failure = triton_counter("nv_inference_request_failure", (*LABELS, "reason"))
    for reason, count in stats.num_failed_by_reason:
        failure.add_metric((*label_values, reason), count)
    yield failure


def batch_size_histogram(stats: ModelStats, max_batch_size: int, label_values: tuple[str, ...]):
    """Items per batch, from the per-size batch counts: bucket bounds 1, 2, 4, ... max_batch_size."""
    bounds = sorted({*(1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size),
                     max_batch_size})
    num_by_size = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    buckets, cumulative = [], 0
    sizes = sorted(num_by_size)
    index = 0
    for bound in bounds:
        while index < len(sizes) and sizes[index] <= bound:
            cumulative += num_by_size[sizes[index]]
            index += 1
        buckets.append((str(float(bound)), cumulative))
    buckets.append(("+Inf", sum(num_by_size.values())))
    family = HistogramMetricFamily("tensoryard_batcher_batch_size", "Items per batch of the dynamic batcher.",
                                   labels=LABELS)
    family.add_metric(label_values, buckets, sum_value=stats.num_items_executed)
    return family


def _gauge(name: str, documentation: str, label_values: tuple[str, ...], value: float,
           label_names: tuple[str, ...] = LABELS) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=label_names)
    family.add_metric(label_values, value)
    return family


def _counter(name: str, documentation: str, label_values: tuple[str, ...], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=LABELS)
    family.add_metric(label_values, value)
    return family


class WorkerCollector:
    """Everything the worker exports beyond the histograms observed as requests finish."""

    def __init__(self, state: WorkerState, devices=None):
        self._state = state
        self._devices = devices  # gpu_metrics.NvmlCollector, or None without a GPU

    def describe(self):
        return []  # families come and go with the model; nothing to reserve at registration

    def collect(self):
        state = self._state
        yield from self._health(state)
        model = state.model
        if model is not None:
            values = (model.name, model.version, state.worker_id)
            stats = model.statistics()
            yield from triton_families(stats, values)
            yield _gauge("nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting "
                         "execution per-model.", values, model.queue_depth)
            batcher = getattr(model, "batcher", None)
            if batcher is not None:
                yield batch_size_histogram(stats, batcher.config.max_batch_size, values)
                yield _gauge("tensoryard_batcher_queue_size", "Items waiting in the dynamic batcher.", values,
                             batcher.queued_items)
            yield _gauge("tensoryard_model_weight_bytes", "Bytes of the loaded weights.", values, model.weight_bytes)
            loop = getattr(model, "loop", None)
            if loop is not None:
                yield _gauge("tensoryard_kv_cache_bytes", "Bytes reserved for the KV cache.", values,
                             model.kv_cache_bytes)
                dtype = getattr(model, "weight_dtype", "")
                yield _gauge("tensoryard_worker_weight_bytes", "Resident bytes of the LLM's weights, labelled with "
                             "the deployment's weight dtype.", (*values, dtype), model.weight_bytes, (*LABELS, "dtype"))
                yield from self._engine(loop, values)
        if self._devices is not None:
            yield from self._devices.collect(state.worker_id)

    @staticmethod
    def _health(state: WorkerState):
        values = (state.model_name, state.worker_id)
        yield _gauge("tensoryard_worker_serving", "1 while the worker's health is SERVING, else 0.", values,
                     1 if state.serving else 0, ("model", "worker"))
        phase = GaugeMetricFamily("tensoryard_worker_phase", "1 for the worker's current phase, 0 for the others.",
                                  labels=("model", "worker", "phase"))
        for member, name in PHASES.items():
            phase.add_metric((*values, name), 1 if state.phase is member else 0)
        yield phase

    @staticmethod
    def _engine(loop, values: tuple[str, ...]):
        stats = loop.stats()
        if stats is None:
            return
        yield _gauge("tensoryard:num_requests_running", "Sequences in the running batch.", values, stats.num_running)
        yield _gauge("tensoryard:num_requests_waiting", "Sequences waiting for a seat.", values, stats.num_waiting)
        usage = stats.num_used_blocks / stats.num_total_blocks if stats.num_total_blocks else 0.0
        yield _gauge("tensoryard:kv_cache_usage_perc", "KV-cache usage: used blocks over all blocks, 0..1.", values,
                     usage)
        yield _counter("tensoryard:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", values,
                       stats.num_prefix_query_tokens)
        yield _counter("tensoryard:prefix_cache_hits", "Prompt tokens found in the prefix cache.", values,
                       stats.num_prefix_hit_tokens)
        yield _counter("tensoryard:num_preemptions", "Sequences preempted (their blocks freed, recomputed later).",
                       values, stats.num_preemptions)
        last_step_unix_s = time.time() - (time.monotonic() - loop.last_progress_s)
        yield _gauge("tensoryard:engine_last_step_timestamp_seconds",
                     "Unix time of the engine's last step or idle heartbeat.", values, last_step_unix_s)
