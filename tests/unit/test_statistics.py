"""The one statistics recorder behind ModelStatistics and nv_inference_*, and the batcher's use of it."""

from __future__ import annotations

import threading
import time

import pytest

from services.common.errors import Overloaded
from services.worker.batcher import BatcherConfig, DynamicBatcher
from services.worker.statistics import BatchSizeStat, DurationStat, StatisticsRecorder


def test_a_batch_counts_each_request_and_the_batch_once():
    recorder = StatisticsRecorder()
    # Two requests enqueued at 0 and 40 ns, one item and two; the batch ran from 100 to 1,100 ns.
    recorder.record_batch([0, 40], [True, True], 3, 100, 1_100, input_ns=100, output_ns=50)
    stats = recorder.snapshot()
    assert stats.success == DurationStat(2, 1_100 + 1_060)
    assert stats.queue == DurationStat(2, 100 + 60)
    assert stats.compute_infer == DurationStat(2, 2 * 850)  # each request carries its whole batch's time
    assert stats.compute_input == DurationStat(2, 200)
    assert (stats.inference_count, stats.execution_count) == (3, 1)
    assert stats.batch_stats == (BatchSizeStat(3, DurationStat(1, 850), DurationStat(1, 100), DurationStat(1, 50)),)
    assert stats.last_inference_ms > 0


def test_a_request_failed_in_its_batch_counts_as_a_backend_failure_but_the_batch_still_ran():
    recorder = StatisticsRecorder()
    recorder.record_batch([0, 0], [True, False], 2, 10, 110)
    stats = recorder.snapshot()
    assert (stats.success.count, stats.fail) == (1, DurationStat(1, 110))
    assert dict(stats.num_failed_by_reason) == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 1, "OTHER": 0}
    assert (stats.inference_count, stats.execution_count, stats.num_items_executed) == (2, 1, 2)


def test_a_generation_is_one_inference_and_one_execution_without_batch_sizes():
    recorder = StatisticsRecorder()
    recorder.record_request(duration_ns=1_000, queue_ns=300)
    stats = recorder.snapshot()
    assert (stats.success, stats.queue, stats.compute_infer) == (
        DurationStat(1, 1_000), DurationStat(1, 300), DurationStat(1, 700))
    assert (stats.inference_count, stats.execution_count, stats.batch_stats) == (1, 1, ())


def test_failures_are_counted_by_reason():
    recorder = StatisticsRecorder()
    for reason in ("REJECTED", "REJECTED", "CANCELED", "OTHER"):
        recorder.record_failure(5, reason)
    stats = recorder.snapshot()
    assert stats.fail == DurationStat(4, 20)
    assert dict(stats.num_failed_by_reason) == {"REJECTED": 2, "CANCELED": 1, "BACKEND": 0, "OTHER": 1}
    with pytest.raises(ValueError, match="reason"):
        recorder.record_failure(0, "TIMEOUT")


def wait_running(batcher: DynamicBatcher) -> None:
    deadline = time.monotonic() + 5
    while batcher.num_in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_full_batcher_queue_counts_a_rejection():
    release = threading.Event()

    def execute(payloads):
        release.wait(5)
        return payloads

    batcher = DynamicBatcher(BatcherConfig(max_batch_size=1, max_queue_size=1), execute)
    try:
        running = batcher.submit("running", 1)
        wait_running(batcher)
        queued = batcher.submit("queued", 1)
        with pytest.raises(Overloaded):
            batcher.submit("refused", 1)
        assert dict(batcher.stats().num_failed_by_reason)["REJECTED"] == 1
        release.set()
        assert (running.result(5), queued.result(5)) == ("running", "queued")
    finally:
        release.set()
        batcher.close(timeout_s=5)
    stats = batcher.stats()
    assert (stats.success.count, stats.fail.count) == (2, 1)


def test_a_request_withdrawn_from_the_queue_counts_as_canceled():
    release = threading.Event()
    batcher = DynamicBatcher(BatcherConfig(max_batch_size=1), lambda payloads: release.wait(5) and payloads)
    try:
        running = batcher.submit("running", 1)
        wait_running(batcher)
        withdrawn = batcher.submit("withdrawn", 1)
        assert withdrawn.cancel()
        release.set()
        running.result(5)
    finally:
        release.set()
        batcher.close(timeout_s=5)
    stats = batcher.stats()
    assert dict(stats.num_failed_by_reason)["CANCELED"] == 1
    assert (stats.success.count, stats.execution_count) == (1, 1)


def test_the_batcher_records_into_the_recorder_it_is_given():
    recorder = StatisticsRecorder()
    batcher = DynamicBatcher(BatcherConfig(max_batch_size=4), lambda payloads: payloads, statistics=recorder)
    try:
        assert batcher.submit("x", 2).result(5) == "x"
    finally:
        batcher.close(timeout_s=5)
    assert recorder.snapshot().inference_count == 2
    assert batcher.stats() == recorder.snapshot()
