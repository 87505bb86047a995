"""Streaming LLM load: a timeline per request, closed and open (Poisson) loops, and the metrics a
generation server is judged by: output tokens/s, time to first token (TTFT), inter-token latency
(ITL) and request latency.

Every response's arrival is timed on the client (time.perf_counter), so the metrics include the
whole serving path. Each metric counts the events that fall inside the measured window: the tokens
that *arrive* in it (throughput), the first tokens that arrive in it (TTFT), the gaps that *end* in
it (ITL) and the requests that *finish* in it (latency). Long requests that straddle the window
edges thus still contribute their in-window part, and a short window still yields numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from bench.loadgen import closed_loop

ERROR_PAUSE_S = 0.1


@dataclass(slots=True)
class RequestTrace:
    sent_at_s: float  # perf_counter clock, as are all times here
    # (arrival time, number of tokens) per response that carried tokens
    chunks: list[tuple[float, int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # where the server sends ids (tensoryard)
    text: str = ""
    finished_at_s: float | None = None
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    error: str = ""

    @property
    def num_output_tokens(self) -> int:
        return sum(num_tokens for _, num_tokens in self.chunks)

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] - self.sent_at_s if self.chunks else None

    def inter_token_gaps(self) -> list[tuple[float, float]]:
        """(end time, gap) per output token after the first; a response with k tokens spreads its
        gap over them."""
        gaps = []
        for (previous_s, _), (arrived_s, num_tokens) in zip(self.chunks, self.chunks[1:]):
            gaps += [(arrived_s, (arrived_s - previous_s) / num_tokens)] * num_tokens
        return gaps


# A traced call runs one streaming request and fills its trace: traced_call(request, traces).
TracedCall = Callable[[object, list[RequestTrace]], Awaitable[RequestTrace]]


@contextlib.asynccontextmanager
async def tracing(traces: list[RequestTrace]):
    """A new trace, in `traces` as soon as the request starts; the block streams into it. Its end
    time is set when the block completes, its error when it raises (the error goes on)."""
    trace = RequestTrace(sent_at_s=time.perf_counter())
    traces.append(trace)
    try:
        yield trace
        trace.finished_at_s = time.perf_counter()
    except asyncio.CancelledError:
        trace.error = "cancelled"
        raise
    except grpc.aio.AioRpcError as error:
        trace.error = f"{error.code().name}: {error.details()}"
        raise
    except Exception as error:
        trace.error = f"{type(error).__name__}: {error}"
        raise


async def traced_generate(stub, request, traces: list[RequestTrace]) -> RequestTrace:
    """One streaming Generate call, timed (bind the stub with functools.partial for a TracedCall)."""
    async with tracing(traces) as trace:
        async for response in stub.Generate(request):
            if response.token_ids:
                trace.chunks.append((time.perf_counter(), len(response.token_ids)))
                trace.token_ids.extend(response.token_ids)
            trace.text += response.text
            if response.finish_reason:
                trace.finish_reason = response.finish_reason
                trace.num_prompt_tokens = response.usage.prompt_tokens
                trace.num_cached_prompt_tokens = response.usage.cached_prompt_tokens
    return trace


def summarize(traces: list[RequestTrace], window_start_s: float, window_end_s: float,
              num_output_tokens: int, latency_over_all: bool = False) -> dict:
    """Metrics of one point. With latency_over_all (open loop), TTFT, ITL and latency count every
    request sent, not only the events inside the window; throughput always counts the window."""
    duration_s = window_end_s - window_start_s

    def inside(t: float) -> bool:
        return latency_over_all or window_start_s <= t <= window_end_s

    tokens_in_window = sum(n for trace in traces for t, n in trace.chunks if window_start_s <= t <= window_end_s)
    finished = [t for t in traces if t.finished_at_s is not None and not t.error]
    finished_in_window = [t for t in finished if window_start_s <= t.finished_at_s <= window_end_s]
    counted = [t for t in finished if inside(t.finished_at_s)]
    ttfts_s = [t.ttft_s for t in traces if t.chunks and inside(t.chunks[0][0])]
    gaps_s = [gap for t in traces for end_s, gap in t.inter_token_gaps() if inside(end_s)]
    latencies_s = [t.finished_at_s - t.sent_at_s for t in counted]
    errors = [t.error for t in traces if t.error and t.error != "cancelled"]
    num_prompt_tokens = sum(t.num_prompt_tokens for t in counted)
    return {
        "duration_s": duration_s,
        "num_requests_sent": len(traces),
        "num_requests_finished_in_window": len(finished_in_window),
        "num_errors": len(errors),
        "first_error": errors[0] if errors else "",
        "num_cancelled": sum(t.error == "cancelled" for t in traces),
        # ignore_eos and a fixed max_tokens: any other count means the server cut a request short
        "num_wrong_length": sum(t.num_output_tokens != num_output_tokens for t in finished),
        "output_tokens_per_s": tokens_in_window / duration_s,
        "requests_per_s": len(finished_in_window) / duration_s,
        "ttft_p50_ms": _percentile_ms(ttfts_s, 50),
        "ttft_p99_ms": _percentile_ms(ttfts_s, 99),
        "itl_p50_ms": _percentile_ms(gaps_s, 50),
        "itl_p99_ms": _percentile_ms(gaps_s, 99),
        "latency_p50_ms": _percentile_ms(latencies_s, 50),
        "latency_p99_ms": _percentile_ms(latencies_s, 99),
        "mean_prompt_tokens": num_prompt_tokens / len(counted) if counted else None,
        "prefix_cached_fraction": (sum(t.num_cached_prompt_tokens for t in counted) / num_prompt_tokens
                                   if num_prompt_tokens else None),
    }


def _percentile_ms(values_s: list[float], percentile: float) -> float | None:
    return float(np.percentile(values_s, percentile)) * 1e3 if values_s else None


# ------------------------------------------------------------------------------------------- loops

async def closed_loop_point(traced_call: TracedCall, next_request: Callable[[], object], concurrency: int,
                            duration_s: float, warmup_s: float) -> tuple[list[RequestTrace], float, float]:
    """N tasks, each streaming one request at a time (bench/loadgen.py); traces and the window."""
    traces: list[RequestTrace] = []

    async def send(_: int) -> None:
        try:
            await traced_call(next_request(), traces)
        except Exception:
            await asyncio.sleep(ERROR_PAUSE_S)  # counted by closed_loop; no tight loop on a dead server
            raise

    result = await closed_loop(send, concurrency, duration_s, warmup_s)
    return traces, result.window_start_s, result.window_end_s


def poisson_arrivals_s(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Arrival offsets from the start: exponential gaps of mean 1/rate, until duration_s."""
    rng = np.random.default_rng(seed)
    arrivals, t = [], 0.0
    while (t := t + rng.exponential(1.0 / rate_per_s)) < duration_s:
        arrivals.append(t)
    return arrivals


async def open_loop_point(traced_call: TracedCall, next_request: Callable[[], object], arrivals_s: list[float],
                          duration_s: float, drain_timeout_s: float) -> tuple[list[RequestTrace], float, float]:
    """Sends at the given offsets whatever is in flight; after duration_s, waits up to
    drain_timeout_s for the stragglers and cancels the rest (their traces say "cancelled")."""
    traces: list[RequestTrace] = []
    tasks: list[asyncio.Task] = []
    start_s = time.perf_counter()
    for offset_s in arrivals_s:
        if (delay_s := start_s + offset_s - time.perf_counter()) > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(traced_call(next_request(), traces)))
    if (rest_s := start_s + duration_s - time.perf_counter()) > 0:
        await asyncio.sleep(rest_s)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return traces, start_s, start_s + duration_s


# ----------------------------------------------------------------------------------- worker stats

@dataclass(slots=True)
class StatsSample:
    at_s: float
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_running: int
    num_waiting: int


@contextlib.asynccontextmanager
async def polling_worker_stats(channel, interval_s: float = 0.1):
    """Polls the worker's GetStats while the block runs; yields the list the samples go to."""
    from protos.tensoryard.v1 import worker_pb2, worker_pb2_grpc

    stub = worker_pb2_grpc.WorkerControlStub(channel)
    samples: list[StatsSample] = []

    async def poll() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed sample is not worth failing a point
                stats = await stub.GetStats(worker_pb2.GetStatsRequest(), timeout=2)
                samples.append(StatsSample(time.perf_counter(), stats.num_kv_blocks_used,
                                           stats.num_kv_blocks_total, stats.num_running, stats.num_waiting))
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(poll())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def peak_stats(samples: list[StatsSample], window_start_s: float, window_end_s: float) -> dict:
    inside = [s for s in samples if window_start_s <= s.at_s <= window_end_s] or samples
    if not inside:
        return {"peak_kv_blocks_used": None, "kv_blocks_total": None, "peak_kv_use": None,
                "peak_num_running": None, "peak_num_waiting": None, "num_stats_samples": 0}
    total = inside[-1].num_kv_blocks_total
    peak_used = max(s.num_kv_blocks_used for s in inside)
    return {
        "peak_kv_blocks_used": peak_used,
        "kv_blocks_total": total,
        "peak_kv_use": peak_used / total if total else None,
        "peak_num_running": max(s.num_running for s in inside),
        "peak_num_waiting": max(s.num_waiting for s in inside),
        "num_stats_samples": len(inside),
    }

