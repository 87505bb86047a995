"""One served model's request statistics, counted once, in the shape of Triton's ModelStatistics.

The dynamic batcher records each batch into a `StatisticsRecorder`, the generation model each
request. Two readers take the same `snapshot()`: the `ModelStatistics` RPC (`model_views`) and the
Prometheus `nv_inference_*` families (`services/worker/metrics.py`, at scrape time), so the two
never disagree and serving pays for one count, not two.

As in Triton, `success`, `queue` and the compute durations are per successful request (a batched
request's compute is its whole batch's); inference and execution counts and the per-batch-size
statistics include batches that failed. A failure is counted with one of Triton's reasons:
REJECTED (refused before it ran: queue full, admission), CANCELED (the caller went away first),
BACKEND (the model or engine failed it), OTHER.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"
FAILURE_REASONS = (REJECTED, CANCELED, BACKEND, OTHER)


@dataclass(frozen=True, slots=True)
class DurationStat:
    """A count and its summed nanoseconds, as Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class BatchSizeStat:
    """Batches of one size, as Triton's InferBatchStatistics."""

    batch_size: int  # items in the batch
    compute_infer: DurationStat  # count = batches of this size, ns = their execute time
    compute_input: DurationStat = DurationStat()  # the part execute reported as preparing inputs
    compute_output: DurationStat = DurationStat()  # the part execute reported as producing outputs


@dataclass(frozen=True, slots=True)
class ModelStats:
    """A consistent snapshot, shaped like Triton's ModelStatistics so the servicer maps it 1:1."""

    success: DurationStat  # per request: submit to result
    fail: DurationStat  # per request: submit to failure
    queue: DurationStat  # per successful request: submit to the start of its execution
    compute_infer: DurationStat  # per successful request: its batch's execute time
    inference_count: int  # items executed
    execution_count: int  # batches executed
    last_inference_ms: int  # wall clock, ms since epoch, when the last execution ended; 0 = never
    batch_stats: tuple[BatchSizeStat, ...]  # sorted by batch_size
    compute_input: DurationStat = DurationStat()  # per successful request, as compute_infer
    compute_output: DurationStat = DurationStat()
    num_failed_by_reason: tuple[tuple[str, int], ...] = ()  # (reason, count), every reason

    @property
    def num_items_executed(self) -> int:
        """Items over all batches, from the per-size counts (equals inference_count)."""
        return sum(b.batch_size * b.compute_infer.count for b in self.batch_stats)


@dataclass(slots=True)
class _BatchSize:
    num_batches: int = 0
    compute_ns: int = 0
    input_ns: int = 0
    output_ns: int = 0


class StatisticsRecorder:
    """The mutable counts behind ModelStats; safe to record into and read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._success_count = 0
        self._success_ns = 0
        self._fail_count = 0
        self._fail_ns = 0
        self._queue_ns = 0
        self._compute_infer_ns = 0
        self._compute_input_ns = 0
        self._compute_output_ns = 0
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._by_size: dict[int, _BatchSize] = {}
        self._fail_by_reason = dict.fromkeys(FAILURE_REASONS, 0)

    def record_batch(self, enqueued_ns: list[int], succeeded: list[bool], num_items: int, start_ns: int,
                     end_ns: int, input_ns: int = 0, output_ns: int = 0) -> None:
        """One batch of the dynamic batcher: each request's enqueue time and outcome, all on
        time.monotonic_ns()'s clock. A request that failed in the batch failed in the backend."""
        compute_ns = end_ns - start_ns - input_ns - output_ns
        with self._lock:
            for request_enqueued_ns, ok in zip(enqueued_ns, succeeded):
                if ok:
                    self._add_success(end_ns - request_enqueued_ns, start_ns - request_enqueued_ns,
                                      compute_ns, input_ns, output_ns)
                else:
                    self._add_failure(end_ns - request_enqueued_ns, BACKEND)
            self._add_execution(num_items, compute_ns, input_ns, output_ns)

    def record_request(self, duration_ns: int, queue_ns: int) -> None:
        """One generation: one inference and one execution, its compute the time it did not spend
        queued. It ran in the engine's continuous batch, which has no batch size of its own: no
        per-batch-size statistics."""
        with self._lock:
            self._add_success(duration_ns, queue_ns, duration_ns - queue_ns, 0, 0)
            self._inference_count += 1
            self._execution_count += 1
            self._last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, duration_ns: int, reason: str) -> None:
        """A request that failed outside a batch: refused, withdrawn, or cut off mid-generation."""
        if reason not in self._fail_by_reason:
            raise ValueError(f"reason must be one of {', '.join(FAILURE_REASONS)}, not {reason!r}")
        with self._lock:
            self._add_failure(duration_ns, reason)

    def _add_success(self, duration_ns: int, queue_ns: int, compute_ns: int, input_ns: int, output_ns: int) -> None:
        self._success_count += 1
        self._success_ns += duration_ns
        self._queue_ns += queue_ns
        self._compute_infer_ns += compute_ns
        self._compute_input_ns += input_ns
        self._compute_output_ns += output_ns

    def _add_failure(self, duration_ns: int, reason: str) -> None:
        self._fail_count += 1
        self._fail_ns += duration_ns
        self._fail_by_reason[reason] += 1

    def _add_execution(self, num_items: int, compute_ns: int, input_ns: int, output_ns: int) -> None:
        self._inference_count += num_items
        self._execution_count += 1
        size = self._by_size.get(num_items)
        if size is None:
            size = self._by_size[num_items] = _BatchSize()
        size.num_batches += 1
        size.compute_ns += compute_ns
        size.input_ns += input_ns
        size.output_ns += output_ns
        self._last_inference_ms = time.time_ns() // 1_000_000

    def snapshot(self) -> ModelStats:
        with self._lock:
            n = self._success_count
            return ModelStats(
                success=DurationStat(n, self._success_ns),
                fail=DurationStat(self._fail_count, self._fail_ns),
                queue=DurationStat(n, self._queue_ns),
                compute_infer=DurationStat(n, self._compute_infer_ns),
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                last_inference_ms=self._last_inference_ms,
                batch_stats=tuple(
                    BatchSizeStat(
                        batch_size,
                        DurationStat(s.num_batches, s.compute_ns),
                        DurationStat(s.num_batches, s.input_ns),
                        DurationStat(s.num_batches, s.output_ns),
                    )
                    for batch_size, s in sorted(self._by_size.items())
                ),
                compute_input=DurationStat(n, self._compute_input_ns),
                compute_output=DurationStat(n, self._compute_output_ns),
                num_failed_by_reason=tuple(self._fail_by_reason.items()),
            )
