"""Dynamic batcher: groups queued requests for one model into batches, as Triton's dynamic batcher.

Policy (Triton's, model-agnostic). Requests are taken in arrival order and never split, so a
batch is always a prefix of the queue whose item count fits `max_batch_size`. A batch leaves at
once when a prefix reaches a preferred batch size (the largest reachable one wins), or when the
next request would not fit, since waiting cannot make the batch any bigger. Otherwise the batcher
holds the batch until the oldest request has waited `max_queue_delay_us`, trading that much
latency for a fuller batch, then takes everything that fits. Without preferred sizes,
`max_batch_size` is the one size worth leaving early for. After `close()` nothing waits for the
delay: the queue drains as fast as `execute` runs.

One worker thread owns batch formation and runs `execute`, one batch at a time. Callers only
append to the queue under the condition variable and wait on their futures.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument, Overloaded, Unavailable
from services.worker.statistics import CANCELED, OTHER, REJECTED, ModelStats, StatisticsRecorder

# Runs one batch: one result per payload, in order; an Exception in a slot fails that request only.
Execute = Callable[[list[Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    max_batch_size: int  # items per batch
    preferred_batch_sizes: tuple[int, ...] = ()  # item counts that dispatch without waiting
    max_queue_delay_us: int = 0  # how long the oldest request may wait for a fuller batch
    max_queue_size: int = 0  # requests waiting before submit raises Overloaded; 0 = unbounded

    def __post_init__(self) -> None:
        _check_int("max_batch_size", self.max_batch_size, minimum=1)
        _check_int("max_queue_delay_us", self.max_queue_delay_us, minimum=0)
        _check_int("max_queue_size", self.max_queue_size, minimum=0)
        # Accept any iterable from flag parsing, but store a tuple so the config stays hashable.
        object.__setattr__(self, "preferred_batch_sizes", tuple(self.preferred_batch_sizes))
        for size in self.preferred_batch_sizes:
            _check_int("preferred_batch_sizes", size, minimum=1)
            if size > self.max_batch_size:
                raise ValueError(
                    f"preferred_batch_sizes must not exceed max_batch_size={self.max_batch_size}, "
                    f"got {size}"
                )


def _check_int(field_name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field_name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class BatchOutput:
    """What `execute` may return instead of a plain list, to split its time as Triton does:
    preparing inputs (e.g. tokenizing, padding), the model, and producing outputs."""

    results: list
    compute_input_ns: int = 0
    compute_output_ns: int = 0


# eq=False: requests are compared by identity, so deque.remove finds exactly this one.
@dataclass(eq=False, slots=True)
class _Request:
    payload: Any
    num_items: int
    enqueued_ns: int
    future: Future = field(default_factory=Future)
    # An asyncio caller's future and its loop; settled from `future` on that loop (_wake_waiters).
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None


class DynamicBatcher:
    """Batches submitted payloads for `execute`; see the module docstring for the policy."""

    def __init__(self, config: BatcherConfig, execute: Execute, name: str = "",
                 statistics: StatisticsRecorder | None = None) -> None:
        self.config = config
        self.name = name
        self._execute = execute
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._num_in_flight = 0
        self._closed = False
        self.statistics = statistics if statistics is not None else StatisticsRecorder()
        self._preferred_sizes = frozenset(config.preferred_batch_sizes or (config.max_batch_size,))
        self._max_queue_delay_ns = config.max_queue_delay_us * 1_000
        self._thread = threading.Thread(
            target=self._run, name=f"batcher-{name}" if name else "batcher", daemon=True
        )
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._queue)

    @property
    def queued_items(self) -> int:
        """Items (a request may hold several) waiting for a batch."""
        with self._cond:
            return sum(request.num_items for request in self._queue)

    @property
    def num_in_flight(self) -> int:
        """Requests in the batch `execute` is running now."""
        with self._cond:
            return self._num_in_flight

    def stats(self) -> ModelStats:
        return self.statistics.snapshot()

    def submit(self, payload: Any, num_items: int) -> Future:
        """Queues one request of `num_items` items; the future holds its result or error."""
        return self._enqueue(payload, num_items, waiter=None)

    def _enqueue(self, payload: Any, num_items: int,
                 waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None) -> Future:
        max_batch_size = self.config.max_batch_size
        is_int = isinstance(num_items, int) and not isinstance(num_items, bool)
        if not is_int or not 1 <= num_items <= max_batch_size:
            raise InvalidArgument(
                f"num_items must be in 1..max_batch_size={max_batch_size}, got {num_items!r}"
            )
        future: Future = Future()
        with self._cond:
            if self._closed:
                self.statistics.record_failure(0, REJECTED)
                raise Unavailable(f"batcher {self.name!r} is closed")
            max_queue_size = self.config.max_queue_size
            if max_queue_size and len(self._queue) >= max_queue_size:
                self.statistics.record_failure(0, REJECTED)
                raise Overloaded(
                    f"batcher {self.name!r} queue is full: {len(self._queue)} requests waiting, "
                    f"max_queue_size={max_queue_size}"
                )
            request = _Request(payload, num_items, time.monotonic_ns(), future, waiter)
            self._queue.append(request)
            self._cond.notify()
        # Added outside the lock: the callback takes the lock, and a future cancelled in the
        # meantime runs its callback right here.
        future.add_done_callback(functools.partial(self._forget_if_cancelled, request))
        return future

    async def submit_async(self, payload: Any, num_items: int) -> Any:
        """submit() for asyncio callers; cancelling the awaiting task withdraws a queued request.

        The batcher wakes each event loop once per batch for all of its requests, where
        `asyncio.wrap_future` would wake it once per request (a self-pipe write each)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        future = self._enqueue(payload, num_items, (loop, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            # A request already executing cannot be withdrawn; its result is simply dropped.
            future.cancel()
            raise

    def close(self, timeout_s: float | None = None) -> None:
        """Stops accepting requests, runs everything queued, then joins the worker thread.

        Requests still queued when `timeout_s` runs out fail with Unavailable, so no caller
        waits forever on a batcher that is gone.
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is self._thread:
            return  # close() from inside execute: the loop exits once the queue drains
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return
        with self._cond:
            abandoned = list(self._queue)
            self._queue.clear()
        now_ns = time.monotonic_ns()
        for request in abandoned:
            if request.future.set_running_or_notify_cancel():
                self.statistics.record_failure(now_ns - request.enqueued_ns, OTHER)
                request.future.set_exception(
                    Unavailable(f"batcher {self.name!r} closed before the request ran")
                )
        _wake_waiters(abandoned)

    def _forget_if_cancelled(self, request: _Request, future: Future) -> None:
        # Frees the queue slot now rather than when the worker reaches it, so a cancelled request
        # neither counts against max_queue_size nor holds the oldest-request delay.
        if not future.cancelled():
            return
        self.statistics.record_failure(time.monotonic_ns() - request.enqueued_ns, CANCELED)
        with self._cond:
            try:
                self._queue.remove(request)
            except ValueError:
                return  # already taken for a batch, which drops it
            self._cond.notify()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute_batch(batch)

    def _next_batch(self) -> list[_Request] | None:
        """Blocks until a batch is due; None once closed and drained."""
        with self._cond:
            while True:
                num_requests, wait_s = self._plan(time.monotonic_ns())
                if num_requests:
                    batch = self._take(num_requests)
                    if batch:
                        self._num_in_flight = len(batch)
                        return batch
                    continue  # every request taken had just been cancelled
                if self._closed and not self._queue:
                    return None
                self._cond.wait(wait_s)

    def _plan(self, now_ns: int) -> tuple[int, float | None]:
        """(requests to dispatch now, or 0 and seconds to wait; None = until notified)."""
        if not self._queue:
            return 0, None
        max_batch_size = self.config.max_batch_size
        num_items = num_requests = num_requests_preferred = 0
        is_full = False
        for request in self._queue:  # stops within max_batch_size items: each request has >= 1
            if num_items + request.num_items > max_batch_size:
                is_full = True
                break
            num_items += request.num_items
            num_requests += 1
            if num_items in self._preferred_sizes:
                num_requests_preferred = num_requests
            if num_items == max_batch_size:
                is_full = True
                break
        if num_requests_preferred:
            return num_requests_preferred, None
        waited_ns = now_ns - self._queue[0].enqueued_ns
        if is_full or self._closed or waited_ns >= self._max_queue_delay_ns:
            return num_requests, None
        return 0, (self._max_queue_delay_ns - waited_ns) / 1e9

    def _take(self, num_requests: int) -> list[_Request]:
        batch = []
        for _ in range(num_requests):
            request = self._queue.popleft()
            # Settles the race with a cancel() that has not yet run its callback: once running,
            # the future can no longer be cancelled.
            if request.future.set_running_or_notify_cancel():
                batch.append(request)
        return batch

    def _execute_batch(self, batch: list[_Request]) -> None:
        start_ns = time.monotonic_ns()
        input_ns = output_ns = 0
        try:
            output = self._execute([request.payload for request in batch])
            if isinstance(output, BatchOutput):
                input_ns, output_ns = output.compute_input_ns, output.compute_output_ns
                output = output.results
            results = list(output)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"execute returned {len(results)} results for {len(batch)} payloads"
                )
        except Exception as error:  # fails this batch only; the batcher keeps serving
            results = [error] * len(batch)
        end_ns = time.monotonic_ns()
        succeeded = [not isinstance(result, BaseException) for result in results]
        # Recorded before any future resolves, so a caller holding its result sees it counted.
        self.statistics.record_batch(
            [request.enqueued_ns for request in batch],
            succeeded,
            sum(request.num_items for request in batch),
            start_ns,
            end_ns,
            input_ns,
            output_ns,
        )
        with self._cond:
            self._num_in_flight = 0
        for request, result, ok in zip(batch, results, succeeded):
            if ok:
                request.future.set_result(result)
            else:
                request.future.set_exception(result)
        _wake_waiters(batch)


def _wake_waiters(requests: list[_Request]) -> None:
    """Settles the asyncio waiters of finished requests: one callback per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
    for request in requests:
        if request.waiter is not None:
            by_loop.setdefault(request.waiter[0], []).append(request)
    for loop, loop_requests in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_waiters, loop_requests)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle_waiters(requests: list[_Request]) -> None:
    """On the waiters' loop: each waiter takes its request's outcome (unless it gave up already)."""
    for request in requests:
        _, waiter = request.waiter
        if waiter.done():
            continue
        future = request.future
        if future.cancelled():
            waiter.cancel()
        elif (error := future.exception()) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(future.result())
