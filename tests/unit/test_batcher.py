"""Behaviour of the dynamic batcher: batch formation, results, failures, limits, stats.

Timing checks are generous bounds on behaviour (did it wait for the delay or not), never speed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.common.errors import InvalidArgument, Overloaded, Unavailable
from services.worker.statistics import DurationStat
from services.worker.batcher import BatcherConfig, BatchOutput, DynamicBatcher

LONG_DELAY_US = 60_000_000  # far longer than any test may take: reaching it means a bug
RESULT_TIMEOUT_S = 5.0


def item(name: str, num_items: int = 1) -> tuple[str, int]:
    """A payload that names itself and carries its item count, so batches can be checked."""
    return (name, num_items)


def result_for(payload: tuple[str, int]) -> str:
    return f"done:{payload[0]}"


class RecordingExecute:
    """execute() that records every batch; with gated=True it holds the first batch until released."""

    def __init__(self, gated: bool = False, run: Callable[[Any], Any] = result_for) -> None:
        self.batches: list[list[Any]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self._gated = gated
        self._run = run

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.batches.append(list(payloads))
        if self._gated and len(self.batches) == 1:
            self.started.set()
            assert self.release.wait(RESULT_TIMEOUT_S)
        return [self._run(payload) for payload in payloads]

    @property
    def batch_names(self) -> list[list[str]]:
        return [[name for name, _ in batch] for batch in self.batches]


@pytest.fixture
def make_batcher():
    created: list[tuple[DynamicBatcher, RecordingExecute]] = []

    def make(execute: Callable[[list[Any]], list[Any]], **config_fields: Any) -> DynamicBatcher:
        config = BatcherConfig(**{"max_batch_size": 4, **config_fields})
        batcher = DynamicBatcher(config, execute, name="test")
        created.append((batcher, execute))
        return batcher

    yield make
    for batcher, execute in created:
        if isinstance(execute, RecordingExecute):
            execute.release.set()
        batcher.close(timeout_s=RESULT_TIMEOUT_S)


def hold_worker(batcher: DynamicBatcher, execute: RecordingExecute):
    """Occupies the worker with a full batch so later submissions queue up together."""
    future = batcher.submit(item("blocker", batcher.config.max_batch_size), batcher.config.max_batch_size)
    assert execute.started.wait(RESULT_TIMEOUT_S)
    return future


def results(futures) -> list[Any]:
    return [future.result(timeout=RESULT_TIMEOUT_S) for future in futures]


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (0,)}, "preferred_batch_sizes"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (5,)}, "preferred_batch_sizes"),
        ({"max_batch_size": 4, "max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"max_batch_size": 4, "max_queue_size": -1}, "max_queue_size"),
    ],
)
def test_config_rejects_out_of_range_field_by_name(fields, named):
    with pytest.raises(ValueError, match=named):
        BatcherConfig(**fields)


def test_config_stores_preferred_sizes_as_tuple():
    assert BatcherConfig(max_batch_size=8, preferred_batch_sizes=[2, 4]).preferred_batch_sizes == (2, 4)


# --- results ------------------------------------------------------------------------------------


def test_each_future_gets_the_result_of_its_own_payload(make_batcher):
    batcher = make_batcher(RecordingExecute(), max_batch_size=4, max_queue_delay_us=1_000)
    names = [f"r{i}" for i in range(20)]
    futures = [batcher.submit(item(name), 1) for name in names]
    assert results(futures) == [f"done:{name}" for name in names]


def test_submit_async_returns_the_result(make_batcher):
    batcher = make_batcher(RecordingExecute(), max_batch_size=4)

    async def main():
        return await asyncio.gather(*(batcher.submit_async(item(f"a{i}"), 1) for i in range(6)))

    assert asyncio.run(main()) == [f"done:a{i}" for i in range(6)]


def test_async_callers_of_one_batch_are_woken_once_and_get_their_own_outcomes(make_batcher):
    def run(payload):
        return ValueError("bad") if payload[0] == "bad" else result_for(payload)

    execute = RecordingExecute(gated=True, run=run)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        call_soon_threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: wakeups.append(args) or call_soon_threadsafe(*args)
        calls = [asyncio.create_task(batcher.submit_async(item(name), 1)) for name in ("a", "bad", "c")]
        while batcher.queue_depth < 3:
            await asyncio.sleep(0.001)
        execute.release.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        return outcomes, len(wakeups)

    (first, bad, third), num_wakeups = asyncio.run(main())
    assert (first, third) == ("done:a", "done:c")
    assert isinstance(bad, ValueError)
    assert num_wakeups == 1  # one batch, one loop: one wakeup for its three callers


# --- batch formation ----------------------------------------------------------------------------


def test_batches_never_exceed_max_batch_size(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)
    sizes = [1, 3, 2, 2, 1, 4, 3, 1, 1, 2]
    futures = [batcher.submit(item(f"r{i}", size), size) for i, size in enumerate(sizes)]
    execute.release.set()
    results(futures)
    assert all(sum(n for _, n in batch) <= 4 for batch in execute.batches)


def test_batches_take_requests_in_arrival_order(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)
    names = [f"r{i}" for i in range(10)]
    futures = [batcher.submit(item(name, 1 + i % 3), 1 + i % 3) for i, name in enumerate(names)]
    execute.release.set()
    results(futures)
    executed = [name for batch in execute.batch_names[1:] for name in batch]
    assert executed == names


def test_request_is_never_split_across_batches(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)
    futures = [batcher.submit(item("a", 3), 3), batcher.submit(item("b", 3), 3)]
    execute.release.set()
    results(futures)
    assert execute.batch_names[1:] == [["a"], ["b"]]


def test_preferred_size_dispatches_without_waiting_for_delay(make_batcher):
    execute = RecordingExecute()
    batcher = make_batcher(
        execute, max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=LONG_DELAY_US
    )
    futures = [batcher.submit(item(f"r{i}"), 1) for i in range(4)]
    assert results(futures) == [f"done:r{i}" for i in range(4)]


def test_max_batch_size_dispatches_without_waiting_when_no_preferred_sizes(make_batcher):
    execute = RecordingExecute()
    batcher = make_batcher(execute, max_batch_size=4, max_queue_delay_us=LONG_DELAY_US)
    futures = [batcher.submit(item(f"r{i}", 2), 2) for i in range(2)]
    assert results(futures) == ["done:r0", "done:r1"]


def test_batch_leaves_without_waiting_when_next_request_does_not_fit(make_batcher):
    execute = RecordingExecute()
    batcher = make_batcher(execute, max_batch_size=4, max_queue_delay_us=LONG_DELAY_US)
    first = batcher.submit(item("a", 3), 3)
    second = batcher.submit(item("b", 2), 2)
    assert first.result(timeout=RESULT_TIMEOUT_S) == "done:a"
    assert not second.done()  # alone and below max_batch_size: it waits for the delay


def test_largest_reachable_preferred_size_wins(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(
        execute, max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_us=LONG_DELAY_US
    )
    hold_worker(batcher, execute)
    futures = [batcher.submit(item(f"r{i}"), 1) for i in range(5)]
    execute.release.set()
    results(futures[:4])
    assert execute.batch_names[1] == ["r0", "r1", "r2", "r3"]
    assert not futures[4].done()  # one item left, below every preferred size: it waits


def test_partial_batch_waits_for_queue_delay(make_batcher):
    delay_s = 0.2
    batcher = make_batcher(
        RecordingExecute(), max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=int(delay_s * 1e6)
    )
    submitted_s = time.monotonic()
    future = batcher.submit(item("lonely"), 1)
    assert future.result(timeout=RESULT_TIMEOUT_S) == "done:lonely"
    assert time.monotonic() - submitted_s >= delay_s * 0.9


def test_partial_batch_collects_requests_arriving_within_the_delay(make_batcher):
    execute = RecordingExecute()
    batcher = make_batcher(execute, max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=500_000)
    futures = [batcher.submit(item(f"r{i}"), 1) for i in range(3)]
    results(futures)
    assert execute.batch_names == [["r0", "r1", "r2"]]


def test_zero_delay_dispatches_a_partial_batch_immediately(make_batcher):
    batcher = make_batcher(RecordingExecute(), max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=0)
    assert batcher.submit(item("now"), 1).result(timeout=RESULT_TIMEOUT_S) == "done:now"


# --- failures -----------------------------------------------------------------------------------


def test_exception_in_a_result_slot_fails_only_that_request(make_batcher):
    def run(payload):
        return ValueError(f"bad {payload[0]}") if payload[0] == "bad" else result_for(payload)

    execute = RecordingExecute(gated=True, run=run)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)
    good, bad, other = (batcher.submit(item(name), 1) for name in ("good", "bad", "other"))
    execute.release.set()
    assert good.result(timeout=RESULT_TIMEOUT_S) == "done:good"
    assert other.result(timeout=RESULT_TIMEOUT_S) == "done:other"
    with pytest.raises(ValueError, match="bad bad"):
        bad.result(timeout=RESULT_TIMEOUT_S)
    assert execute.batch_names[1] == ["good", "bad", "other"]


def test_execute_raising_fails_its_batch_and_the_next_batch_succeeds(make_batcher):
    calls = []

    def execute(payloads):
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [result_for(payload) for payload in payloads]

    batcher = make_batcher(execute, max_batch_size=2)
    failed = [batcher.submit(item("a"), 1), batcher.submit(item("b"), 1)]
    for future in failed:
        with pytest.raises(RuntimeError, match="device lost"):
            future.result(timeout=RESULT_TIMEOUT_S)
    assert results([batcher.submit(item("c"), 1), batcher.submit(item("d"), 1)]) == ["done:c", "done:d"]


def test_wrong_number_of_results_fails_the_batch(make_batcher):
    batcher = make_batcher(lambda payloads: ["only one"], max_batch_size=2)
    futures = [batcher.submit(item("a"), 1), batcher.submit(item("b"), 1)]
    for future in futures:
        with pytest.raises(RuntimeError, match="1 results for 2 payloads"):
            future.result(timeout=RESULT_TIMEOUT_S)


# --- admission ----------------------------------------------------------------------------------


def test_full_queue_raises_overloaded(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4, max_queue_size=2)
    hold_worker(batcher, execute)
    batcher.submit(item("a"), 1)
    batcher.submit(item("b"), 1)
    with pytest.raises(Overloaded, match=r"full.*max_queue_size=2"):
        batcher.submit(item("c"), 1)


@pytest.mark.parametrize("num_items", [0, 5])
def test_num_items_outside_one_to_max_batch_size_is_invalid(make_batcher, num_items):
    batcher = make_batcher(RecordingExecute(), max_batch_size=4)
    with pytest.raises(InvalidArgument, match=rf"max_batch_size=4, got {num_items}"):
        batcher.submit(item("x", num_items), num_items)


def test_submit_after_close_raises_unavailable(make_batcher):
    batcher = make_batcher(RecordingExecute(), max_batch_size=4)
    batcher.close(timeout_s=RESULT_TIMEOUT_S)
    with pytest.raises(Unavailable):
        batcher.submit(item("late"), 1)


def test_close_runs_queued_requests_without_waiting_for_delay(make_batcher):
    execute = RecordingExecute()
    batcher = make_batcher(execute, max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=LONG_DELAY_US)
    futures = [batcher.submit(item(f"r{i}"), 1) for i in range(3)]
    batcher.close(timeout_s=RESULT_TIMEOUT_S)
    assert [future.result(timeout=0) for future in futures] == ["done:r0", "done:r1", "done:r2"]


# --- cancellation -------------------------------------------------------------------------------


def test_cancelled_request_never_reaches_execute(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)
    kept, dropped, also_kept = (batcher.submit(item(name), 1) for name in ("kept", "dropped", "also_kept"))
    assert dropped.cancel()
    execute.release.set()
    results([kept, also_kept])
    assert execute.batch_names[1:] == [["kept", "also_kept"]]


def test_cancelled_request_frees_its_queue_slot(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4, max_queue_size=1)
    hold_worker(batcher, execute)
    batcher.submit(item("withdrawn"), 1).cancel()
    assert batcher.queue_depth == 0
    batcher.submit(item("next"), 1)  # would raise Overloaded if the slot were still taken


def test_cancelling_the_awaiting_task_withdraws_a_queued_request(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)

    async def main():
        task = asyncio.create_task(batcher.submit_async(item("withdrawn"), 1))
        while batcher.queue_depth == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert batcher.queue_depth == 0
    execute.release.set()
    assert batcher.submit(item("after"), 4).result(timeout=RESULT_TIMEOUT_S) == "done:after"
    assert "withdrawn" not in [name for batch in execute.batch_names for name in batch]


# --- depth and stats ----------------------------------------------------------------------------


def test_queue_depth_and_num_in_flight_track_waiting_and_running_requests(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    hold_worker(batcher, execute)
    futures = [batcher.submit(item(f"r{i}"), 1) for i in range(3)]
    assert (batcher.queue_depth, batcher.num_in_flight) == (3, 1)
    execute.release.set()
    results(futures)
    assert (batcher.queue_depth, batcher.num_in_flight) == (0, 0)


def test_stats_count_every_item_and_batch(make_batcher):
    execute = RecordingExecute(gated=True)
    batcher = make_batcher(execute, max_batch_size=4)
    blocker = hold_worker(batcher, execute)
    sizes = [1, 3, 2, 2, 1, 4, 3]
    futures = [batcher.submit(item(f"r{i}", size), size) for i, size in enumerate(sizes)]
    execute.release.set()
    results([blocker, *futures])

    stats = batcher.stats()
    total_items = 4 + sum(sizes)
    assert stats.inference_count == total_items
    assert stats.execution_count == len(execute.batches)
    assert stats.success.count == stats.queue.count == stats.compute_infer.count == 1 + len(sizes)
    assert stats.fail.count == 0
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == total_items
    assert stats.success.ns >= stats.queue.ns
    assert stats.last_inference_ms > 0


def test_stats_count_failed_requests_apart_from_successes(make_batcher):
    def run(payload):
        return ValueError("bad") if payload[0] == "bad" else result_for(payload)

    batcher = make_batcher(RecordingExecute(run=run), max_batch_size=2)
    futures = [batcher.submit(item("good"), 1), batcher.submit(item("bad"), 1)]
    for future in futures:
        future.exception(timeout=RESULT_TIMEOUT_S)

    stats = batcher.stats()
    assert (stats.success.count, stats.fail.count) == (1, 1)
    assert stats.inference_count == 2
    assert stats.fail.ns > 0


def test_execute_can_split_its_time_into_input_infer_and_output():
    def execute(payloads):
        time.sleep(0.01)
        return BatchOutput([p * 2 for p in payloads], compute_input_ns=3_000_000, compute_output_ns=2_000_000)

    batcher = DynamicBatcher(BatcherConfig(max_batch_size=4), execute)
    try:
        assert batcher.submit(21, 1).result(timeout=5) == 42
        stats = batcher.stats()
    finally:
        batcher.close(timeout_s=5)
    assert stats.compute_input == DurationStat(1, 3_000_000)
    assert stats.compute_output == DurationStat(1, 2_000_000)
    assert stats.compute_infer.ns >= 10_000_000 - 5_000_000
    assert stats.batch_stats[0].compute_input == DurationStat(1, 3_000_000)
