"""Closed-loop load: N asyncio tasks, each sending its next request as soon as the last one answers.

Each task runs through a warm-up window and then a measured window. A request counts when it
*finishes* inside the measured window, so throughput is unbiased in steady state; requests still in
flight when the window closes are awaited but not counted. Latencies are those of the counted
requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

# send(i) issues request number i of its task (the caller picks the payload from i).
Send = Callable[[int], Awaitable[object]]


@dataclass(slots=True)
class LoadResult:
    concurrency: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    num_errors: int = 0
    first_error: str = ""
    # The measured window on time.perf_counter()'s clock, for callers that time events of their own.
    window_start_s: float = 0.0
    window_end_s: float = 0.0

    @property
    def num_requests(self) -> int:
        return len(self.latencies_s)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.duration_s

    def latency_ms(self, percentile: float) -> float | None:
        if not self.latencies_s:
            return None
        return float(np.percentile(self.latencies_s, percentile)) * 1e3

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "num_requests": self.num_requests,
            "num_errors": self.num_errors,
            "first_error": self.first_error,
            "requests_per_s": self.requests_per_s,
            "p50_ms": self.latency_ms(50),
            "p90_ms": self.latency_ms(90),
            "p99_ms": self.latency_ms(99),
            "mean_ms": float(np.mean(self.latencies_s)) * 1e3 if self.latencies_s else None,
        }


async def closed_loop(send: Send, concurrency: int, duration_s: float, warmup_s: float) -> LoadResult:
    result = LoadResult(concurrency=concurrency, duration_s=duration_s)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    result.window_start_s, result.window_end_s = measure_from, stop_at

    async def client_task(task_index: int) -> None:
        i = task_index
        while (sent_at := time.perf_counter()) < stop_at:
            try:
                await send(i)
            except Exception as error:  # noqa: BLE001 - a failed request is counted, not fatal
                result.num_errors += 1
                result.first_error = result.first_error or f"{type(error).__name__}: {error}"
            else:
                done_at = time.perf_counter()
                if measure_from <= done_at <= stop_at:
                    result.latencies_s.append(done_at - sent_at)
            i += concurrency

    await asyncio.gather(*(client_task(t) for t in range(concurrency)))
    return result
