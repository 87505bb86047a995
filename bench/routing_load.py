"""One routing point: a scenario's requests through one router, with the workers watched.

The load is bench/llm_load.py's: streaming `tensoryard.v1.TextGeneration/Generate` calls, each timed
on the client, sent closed loop (the capacity calibration) or at fixed Poisson offsets (the measured
runs). Both begin with a warm-up that fills the caches and queues and is not measured: the
metrics are those of the requests sent after it (latencies, errors, hit rates) and of the tokens
that arrive after it until the arrivals end (throughput). While a point runs, each worker's
`WorkerControl.GetStats` is sampled every `STATS_INTERVAL_S`; its counters are read once when the
warm-up ends and once after the point (the last stragglers included).

What a point reports, beside bench/llm_load.py's summary:
- TTFT p50/p90/p99 over every request sent that was not refused: one still without a first token
  when the drain timeout ends the point counts as infinitely late (so an overloaded policy cannot
  look better by leaving its slowest requests out);
- the prefix hit rate from the workers: the deltas of num_prefix_hit_tokens over
  num_prefix_query_tokens, summed over the workers (prompt tokens the engine found cached at
  admission, over those it looked up; a preempted sequence looks up again), and, to compare, the
  share of the measured requests' prompt tokens their final responses report as cached
  (usage.cached_prompt_tokens);
- in-flight per worker (num_running + num_waiting): the max, median and mean of its samples in the
  measured window, and the balance across workers: the largest worker's mean over the median
  worker's mean (with two workers the median is their average, so 1.3 means a 65/35 split);
- requests served, refused (num_rejected) and generated tokens per worker, from the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import Counter

import grpc
import numpy as np

from bench.llm_load import (RequestTrace, StatsSample, closed_loop_point, open_loop_point, polling_worker_stats,
                            summarize, traced_generate)

STATS_INTERVAL_S = 0.1
# A closed loop's clients start spread over this long (at most half its warm-up): sixteen 500-token
# prefills sent at once would otherwise march through prefill and decode in step, in waves longer
# than a short window.
CLOSED_LOOP_SPREAD_S = 8.0
CENSORED_MS = float("inf")


async def worker_counters(addresses: list[str]) -> list[dict]:
    from protos.tensoryard.v1 import worker_pb2, worker_pb2_grpc

    counters = []
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            stats = await worker_pb2_grpc.WorkerControlStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)
        counters.append({
            "worker_id": stats.worker_id, "num_requests_ok": stats.num_requests_ok,
            "num_requests_failed": stats.num_requests_failed, "num_rejected": stats.num_rejected,
            "num_prefix_query_tokens": stats.num_prefix_query_tokens,
            "num_prefix_hit_tokens": stats.num_prefix_hit_tokens,
            "num_generated_tokens": stats.num_generated_tokens, "num_kv_blocks_total": stats.num_kv_blocks_total,
            "max_num_seqs": stats.max_num_seqs,
        })
    return counters


async def open_loop_run(router: str, workers: list[str], requests: list, arrivals_s: list[float], warmup_s: float,
                        duration_s: float, drain_timeout_s: float, max_tokens: int,
                        metadata: list[tuple[str, str] | None] | None = None) -> dict:
    """The requests at the arrival offsets (over warmup_s + duration_s) through `router`; the
    summary of the measured part (see the module)."""
    if len(requests) < len(arrivals_s):
        raise ValueError(f"{len(arrivals_s)} arrivals but only {len(requests)} requests")
    async with grpc.aio.insecure_channel(router) as channel:
        call = _call(channel, requests, metadata)
        async with _sampling(workers) as samples:
            before = asyncio.create_task(_counters_after(warmup_s, workers))
            traces, start_s, end_s = await open_loop_point(call, iter(range(len(arrivals_s))).__next__,
                                                           arrivals_s, warmup_s + duration_s, drain_timeout_s)
            before = await before
        after = await worker_counters(workers)
    return _point_summary(traces, start_s + warmup_s, end_s, max_tokens, before, after, samples)


async def closed_loop_run(router: str, workers: list[str], requests: list, concurrency: int, duration_s: float,
                          warmup_s: float, max_tokens: int,
                          metadata: list[tuple[str, str] | None] | None = None) -> dict:
    """`concurrency` clients, each sending the next request as its last one ends (the calibration)."""
    async with grpc.aio.insecure_channel(router) as channel:
        call = _call(channel, requests, metadata, concurrency, min(warmup_s / 2, CLOSED_LOOP_SPREAD_S) / concurrency)
        async with _sampling(workers) as samples:
            before = asyncio.create_task(_counters_after(warmup_s, workers))
            traces, start_s, end_s = await closed_loop_point(call, itertools.count().__next__, concurrency,
                                                             duration_s, warmup_s)
            before = await before
        after = await worker_counters(workers)
    summary = _point_summary(traces, start_s, end_s, max_tokens, before, after, samples)
    summary["concurrency"] = concurrency
    return summary


async def _counters_after(delay_s: float, workers: list[str]) -> list[dict]:
    await asyncio.sleep(delay_s)
    return await worker_counters(workers)


def _call(channel, requests: list, metadata: list[tuple[str, str] | None] | None, num_staggered: int = 0,
          stagger_s: float = 0.0):
    """A TracedCall taking a request number: request number % len(requests), with its metadata.
    Request k < num_staggered (the first of closed-loop client k) waits k * stagger_s first, untimed."""
    from protos.tensoryard.v1 import generation_pb2_grpc

    stub = generation_pb2_grpc.TextGenerationStub(channel)

    async def call(number: int, traces: list[RequestTrace]) -> RequestTrace:
        if number < num_staggered:
            await asyncio.sleep(number * stagger_s)
        index = number % len(requests)
        pair = metadata[index] if metadata else None
        return await traced_generate(_WithMetadata(stub, (pair,) if pair else None), requests[index], traces)

    return call


class _WithMetadata:
    """The stub as traced_generate calls it, .Generate(request), with the request's metadata."""

    __slots__ = ("metadata", "stub")

    def __init__(self, stub, metadata):
        self.stub, self.metadata = stub, metadata

    def Generate(self, request):
        return self.stub.Generate(request, metadata=self.metadata)


@contextlib.asynccontextmanager
async def _sampling(workers: list[str]):
    """GetStats of every worker every STATS_INTERVAL_S; yields one sample list per worker."""
    async with contextlib.AsyncExitStack() as stack:
        samples = []
        for address in workers:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            samples.append(await stack.enter_async_context(polling_worker_stats(channel, STATS_INTERVAL_S)))
        yield samples


def _point_summary(traces: list[RequestTrace], start_s: float, end_s: float, max_tokens: int,
                   before: list[dict], after: list[dict], samples: list[list[StatsSample]]) -> dict:
    """Requests sent in [start_s, end_s] (the measured ones) for latencies, errors and usage; the
    tokens of every request that arrive in it for throughput."""
    measured = [t for t in traces if t.sent_at_s >= start_s]
    summary = summarize(measured, start_s, end_s, max_tokens, latency_over_all=True)
    window = summarize(traces, start_s, end_s, max_tokens)
    summary |= {"output_tokens_per_s": window["output_tokens_per_s"], "requests_per_s": window["requests_per_s"],
                "num_requests_finished_in_window": window["num_requests_finished_in_window"],
                "num_requests_sent_before_window": len(traces) - len(measured)}
    refused = [t for t in measured if t.error and t.error != "cancelled"]
    answered = [t for t in measured if not (t.error and t.error != "cancelled")]
    ttfts_ms = sorted(t.ttft_s * 1e3 if t.chunks else CENSORED_MS for t in answered)
    summary |= {f"ttft_p{p}_ms": percentile(ttfts_ms, p) for p in (50, 90, 99)}
    summary["num_without_first_token"] = sum(not t.chunks for t in answered)
    summary["errors_by_code"] = dict(Counter(t.error.split(":", 1)[0] for t in refused))
    # Per measured request, in send order (None: no first token): for the CDFs and the bootstrap
    # intervals of the report.
    summary["measured_requests"] = {
        "ttft_ms": [round(t.ttft_s * 1e3, 2) if t.chunks else None for t in answered],
        "prompt_tokens": [t.num_prompt_tokens for t in answered],
        "cached_prompt_tokens": [t.num_cached_prompt_tokens for t in answered],
    }
    last_s = max((t.chunks[-1][0] for t in measured if t.chunks), default=end_s)
    summary["last_token_after_window_s"] = max(last_s - end_s, 0.0)
    summary["workers"] = [_worker_summary(b, a, s, start_s, end_s) for b, a, s in zip(before, after, samples)]
    queries = sum(w["num_prefix_query_tokens"] for w in summary["workers"])
    hits = sum(w["num_prefix_hit_tokens"] for w in summary["workers"])
    summary["prefix_hit_rate"] = hits / queries if queries else None
    summary["num_rejected_by_workers"] = sum(w["num_rejected"] for w in summary["workers"])
    means = [w["in_flight_mean"] for w in summary["workers"] if w["in_flight_mean"] is not None]
    medians = [w["in_flight_median"] for w in summary["workers"] if w["in_flight_median"] is not None]
    summary["in_flight_balance"] = _max_over_median(means)
    summary["in_flight_balance_of_medians"] = _max_over_median(medians)
    served = [w["num_requests_ok"] for w in summary["workers"]]
    summary["requests_served_balance"] = _max_over_median(served)
    return summary


def _worker_summary(before: dict, after: dict, samples: list[StatsSample], start_s: float, end_s: float) -> dict:
    deltas = {key: after[key] - before[key] for key in ("num_requests_ok", "num_requests_failed", "num_rejected",
                                                         "num_prefix_query_tokens", "num_prefix_hit_tokens",
                                                         "num_generated_tokens")}
    inside = [s.num_running + s.num_waiting for s in samples if start_s <= s.at_s <= end_s]
    return {
        "worker_id": after["worker_id"], **deltas,
        "prefix_hit_rate": (deltas["num_prefix_hit_tokens"] / deltas["num_prefix_query_tokens"]
                            if deltas["num_prefix_query_tokens"] else None),
        "in_flight_max": max(inside) if inside else None,
        "in_flight_median": float(np.median(inside)) if inside else None,
        "in_flight_mean": float(np.mean(inside)) if inside else None,
        "num_stats_samples": len(inside),
        "peak_kv_blocks_used": max((s.num_kv_blocks_used for s in samples if start_s <= s.at_s <= end_s), default=None),
        "num_kv_blocks_total": after["num_kv_blocks_total"],
    }


def percentile(sorted_values: list[float], p: float) -> float | None:
    """numpy's linear percentile of ascending values, infinite when it falls on or next to a
    censored (infinite) value."""
    if not sorted_values:
        return None
    position = p / 100 * (len(sorted_values) - 1)
    low, high = sorted_values[math.floor(position)], sorted_values[math.ceil(position)]
    if not math.isfinite(high):
        return CENSORED_MS
    return float(low + (high - low) * (position - math.floor(position)))


def _max_over_median(values: list[float]) -> float | None:
    if not values:
        return None
    median = float(np.median(values))
    return max(values) / median if median > 0 else None

