"""`EngineLoop`: the engine in a thread of its own, reached only through queues.

Two queues cross the boundary: an inbox of commands (AddRequest, AbortRequest, Shutdown, and the
test faults HangEngine / CrashEngine) and an outbox of events (a step's RequestOutputs, a
RequestFailed, an EngineReport). The engine thread owns the engine outright; a dispatcher thread on
the caller's side fans the outbox out to per-request queues and hands each report to whoever
subscribed (the worker's load stream). Nothing else is shared, so moving `_run_engine` into a
process of its own means swapping the two queue.Queues for multiprocessing ones (the commands and
events are plain picklable data). Whether to do that is to be decided by measurement
(docs/ENGINE.md).

Progress. After every step, and every `heartbeat_s` while idle, the engine thread publishes a report
stamped with the time: a worker whose engine is hung (a kernel that never returns, a deadlock) stops
getting reports, and that — not the process being alive — is what its health follows.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.errors import AlreadyExists, TensoryardError, Unavailable
from services.worker.engine.engine import EngineStats, LLMEngine, RequestOutput, StepRecord
from services.worker.engine.kv_cache import KVEvents
from services.worker.engine.sampler import SamplingParams

log = logging.getLogger(__name__)

# An idle engine still reports this often, so its silence means it is stuck.
DEFAULT_HEARTBEAT_S = 0.25
# The engine thread (and the math threads it starts, which inherit it) runs at a lower CPU priority
# than the process's gRPC threads: when the cores are saturated, a request that is only to be
# refused, or a token that is only to be sent on, should not wait behind a batch step. On a 2-core
# box with two busy engines, the router's refusals took up to 150 ms at the same priority.
ENGINE_THREAD_NICE = 5


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    deadline_s: float | None = None
    tenant: str = ""
    output_token_ids: tuple[int, ...] = ()  # resumed: generated elsewhere, already sent


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class HangEngine:
    """Test fault: the engine thread sleeps for duration_s, making no progress."""

    duration_s: float


@dataclass(frozen=True, slots=True)
class CrashEngine:
    """Test fault: the next step raises, as a kernel failure would."""


@dataclass(frozen=True, slots=True)
class EngineReport:
    """Published after each step and each idle heartbeat."""

    stats: EngineStats
    kv_events: KVEvents = field(default_factory=KVEvents)
    at_s: float = 0.0  # time.monotonic() when the engine made this progress
    # AddRequests the engine has taken from its inbox so far: what a caller submitted after the
    # num_requests_received-th submission is not in these stats yet.
    num_requests_received: int = 0
    step: StepRecord | None = None  # the step just run; None for an idle heartbeat


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: str
    error: TensoryardError


@dataclass(frozen=True, slots=True)
class EngineStopped:
    error: TensoryardError | None  # None: a clean shutdown


def _lower_own_priority(increment: int) -> None:
    """Raise the calling thread's nice value (Linux: niceness is per thread). Best effort."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
    except (AttributeError, OSError):
        pass


class _InjectedFault(RuntimeError):
    pass


def _run_engine(engine: LLMEngine, inbox: queue.Queue, outbox: queue.Queue, heartbeat_s: float) -> None:
    """The engine side: read commands, step while there is work, publish events."""
    crash_next_step = False
    num_requests_received = 0
    while True:
        commands = []
        if not engine.has_unfinished():
            try:
                commands.append(inbox.get(timeout=heartbeat_s))
            except queue.Empty:
                pass  # idle: the report below is the heartbeat
        while True:
            try:
                commands.append(inbox.get_nowait())
            except queue.Empty:
                break
        for command in commands:
            if isinstance(command, Shutdown):
                for request_id in list(engine.scheduler.requests):
                    engine.abort(request_id)
                outbox.put(engine.step())  # reports each abort
                outbox.put(EngineStopped(None))
                return
            if isinstance(command, AbortRequest):
                engine.abort(command.request_id)
            elif isinstance(command, HangEngine):
                time.sleep(command.duration_s)
            elif isinstance(command, CrashEngine):
                crash_next_step = True
            else:
                num_requests_received += 1
                try:
                    engine.add_request(
                        command.request_id, command.prompt_token_ids, command.params, command.priority,
                        command.deadline_s, command.tenant, command.output_token_ids,
                    )
                except TensoryardError as error:
                    outbox.put(RequestFailed(command.request_id, error))
        step = None
        if engine.has_unfinished() or crash_next_step:
            try:
                if crash_next_step:
                    raise _InjectedFault("injected engine failure (WorkerControl.InjectFault)")
                outputs = engine.step()
            except Exception as error:  # the engine's state is suspect now: fail everything and stop
                log.exception("engine step failed")
                outbox.put(EngineStopped(Unavailable(f"engine step failed: {type(error).__name__}: {error}")))
                return
            outbox.put(outputs)
            step = engine.last_step
        outbox.put(EngineReport(engine.stats(), engine.take_kv_events(), time.monotonic(), num_requests_received, step))


class EngineLoop:
    """Owns an LLMEngine built by engine_factory inside its own thread."""

    def __init__(self, engine_factory: Callable[[], LLMEngine], heartbeat_s: float = DEFAULT_HEARTBEAT_S):
        self._engine_factory = engine_factory
        self.heartbeat_s = heartbeat_s
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._streams: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()  # guards _streams and _stopped against submit/dispatch races
        self._stopped: TensoryardError | None = Unavailable("engine loop is not started")
        self._stats: EngineStats | None = None
        self.num_submitted = 0  # AddRequests put in the inbox (warm-up included)
        self.last_progress_s = time.monotonic()
        # Called on the dispatcher thread with each EngineReport, then with the EngineStopped error.
        self._report_listeners: list[Callable[[EngineReport], None]] = []
        self._stop_listeners: list[Callable[[TensoryardError | None], None]] = []
        self._engine_thread: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        """Builds the engine in its thread; raises what building raised."""
        built: queue.Queue = queue.Queue()

        def run() -> None:
            _lower_own_priority(ENGINE_THREAD_NICE)
            try:
                engine = self._engine_factory()
            except BaseException as error:  # handed to start(), which raises it
                built.put(error)
                return
            built.put(None)
            _run_engine(engine, self._inbox, self._outbox, self.heartbeat_s)

        self._engine_thread = threading.Thread(target=run, name="engine", daemon=True)
        self._engine_thread.start()
        error = built.get(timeout=timeout_s)
        if error is not None:
            raise error
        self._stopped = None
        self._dispatch_thread = threading.Thread(target=self._dispatch, name="engine-dispatch", daemon=True)
        self._dispatch_thread.start()

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        deadline_s: float | None = None,
        stream=None,
        tenant: str = "",
        output_token_ids=(),
    ) -> queue.Queue:
        """A queue that receives the request's RequestOutputs, the last one finished; or, instead of
        that last one, a TensoryardError (bad request, engine stopped).

        `stream` may be any object with `put(item)` (an asyncio bridge, say); it is called on the
        dispatcher thread.
        """
        stream = stream if stream is not None else queue.Queue()
        with self._lock:
            if self._stopped is not None:
                raise self._stopped
            if request_id in self._streams:
                raise AlreadyExists(f"request_id {request_id!r} is already in flight")
            self._streams[request_id] = stream
            self.num_submitted += 1
            self._inbox.put(AddRequest(
                request_id, list(prompt_token_ids), params, priority, deadline_s, tenant, tuple(output_token_ids)
            ))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def inject(self, fault: HangEngine | CrashEngine) -> None:
        """Test hook (WorkerControl.InjectFault, off unless the worker enables it)."""
        self._inbox.put(fault)

    def stats(self) -> EngineStats | None:
        """The snapshot published after the latest step (None before the first)."""
        return self._stats

    @property
    def stopped(self) -> TensoryardError | None:
        """Why the loop no longer takes requests (None while it does)."""
        return self._stopped

    def on_report(self, listener: Callable[[EngineReport], None]) -> None:
        self._report_listeners.append(listener)

    def on_stop(self, listener: Callable[[TensoryardError | None], None]) -> None:
        """listener(None) after a clean shutdown, listener(error) when the engine failed."""
        self._stop_listeners.append(listener)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Aborts what is in flight (each stream gets its "abort" output) and stops both threads."""
        self._inbox.put(Shutdown())
        for thread in (self._engine_thread, self._dispatch_thread):
            if thread is not None:
                thread.join(timeout_s)

    def _dispatch(self) -> None:
        while True:
            event = self._outbox.get()
            if isinstance(event, EngineReport):
                self._stats = event.stats
                self.last_progress_s = event.at_s
                for listener in self._report_listeners:
                    listener(event)
            elif isinstance(event, list):
                for output in event:
                    self._deliver(output.request_id, output, output.finished)
            elif isinstance(event, RequestFailed):
                self._deliver(event.request_id, event.error, True)
            elif isinstance(event, EngineStopped):
                self._stop(event.error or Unavailable("engine loop is shut down"))
                for listener in self._stop_listeners:
                    listener(event.error)
                return

    def _deliver(self, request_id: str, item: RequestOutput | TensoryardError, last: bool) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _stop(self, error: TensoryardError) -> None:
        with self._lock:
            self._stopped = error
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
