"""The dynamic batcher's statistics, shaped like Triton's ModelStatistics.

`StatsRecorder` counts under the batcher's lock; `BatcherStats` is the consistent snapshot the
servicer maps 1:1 onto the protocol's statistics messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
class BatcherStats:
    """A consistent snapshot, shaped like Triton's ModelStatistics so the servicer maps it 1:1.

    As in Triton, queue and compute_infer are per successful request: each success adds its own
    wait and its whole batch's execute time. Batch-level counts include batches that failed.
    """

    success: DurationStat  # per request: submit to result
    fail: DurationStat  # per request: submit to failure
    queue: DurationStat  # per successful request: submit to batch start
    compute_infer: DurationStat  # per successful request: its batch's execute time
    inference_count: int  # items executed
    execution_count: int  # batches executed
    last_inference_ms: int  # wall clock, ms since epoch, when the last batch ended; 0 = never
    batch_stats: tuple[BatchSizeStat, ...]  # sorted by batch_size
    compute_input: DurationStat = DurationStat()  # per successful request, as compute_infer
    compute_output: DurationStat = DurationStat()


@dataclass(slots=True)
class StatsRecorder:
    """Mutable counters behind BatcherStats; the batcher's lock guards them."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_infer_ns: int = 0
    compute_input_ns: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    num_batches_by_size: dict[int, int] = field(default_factory=dict)
    compute_ns_by_size: dict[int, int] = field(default_factory=dict)
    input_ns_by_size: dict[int, int] = field(default_factory=dict)
    output_ns_by_size: dict[int, int] = field(default_factory=dict)

    def record_batch(
        self,
        enqueued_ns: list[int],
        succeeded: list[bool],
        num_items: int,
        start_ns: int,
        end_ns: int,
        input_ns: int = 0,
        output_ns: int = 0,
    ) -> None:
        compute_ns = end_ns - start_ns - input_ns - output_ns
        for request_enqueued_ns, ok in zip(enqueued_ns, succeeded):
            if ok:
                self.success_count += 1
                self.success_ns += end_ns - request_enqueued_ns
                self.queue_ns += start_ns - request_enqueued_ns
                self.compute_infer_ns += compute_ns
                self.compute_input_ns += input_ns
                self.compute_output_ns += output_ns
            else:
                self.fail_count += 1
                self.fail_ns += end_ns - request_enqueued_ns
        self.inference_count += num_items
        self.execution_count += 1
        self.num_batches_by_size[num_items] = self.num_batches_by_size.get(num_items, 0) + 1
        self.compute_ns_by_size[num_items] = self.compute_ns_by_size.get(num_items, 0) + compute_ns
        self.input_ns_by_size[num_items] = self.input_ns_by_size.get(num_items, 0) + input_ns
        self.output_ns_by_size[num_items] = self.output_ns_by_size.get(num_items, 0) + output_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def snapshot(self) -> BatcherStats:
        return BatcherStats(
            success=DurationStat(self.success_count, self.success_ns),
            fail=DurationStat(self.fail_count, self.fail_ns),
            queue=DurationStat(self.success_count, self.queue_ns),
            compute_infer=DurationStat(self.success_count, self.compute_infer_ns),
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            last_inference_ms=self.last_inference_ms,
            batch_stats=tuple(
                BatchSizeStat(
                    size,
                    DurationStat(count, self.compute_ns_by_size[size]),
                    DurationStat(count, self.input_ns_by_size[size]),
                    DurationStat(count, self.output_ns_by_size[size]),
                )
                for size, count in sorted(self.num_batches_by_size.items())
            ),
            compute_input=DurationStat(self.success_count, self.compute_input_ns),
            compute_output=DurationStat(self.success_count, self.compute_output_ns),
        )
