"""`EngineLoop`: the engine in a thread of its own, reached only through queues.

Two queues cross the boundary: an inbox of commands (AddRequest, AbortRequest, Shutdown) and an
outbox of events (a step's RequestOutputs, a RequestFailed, a stats snapshot). The engine thread owns
the engine outright; a dispatcher thread on the caller's side fans the outbox out to per-request
queues. Nothing else is shared, so moving `_run_engine` into a process of its own means swapping
the two queue.Queues for multiprocessing ones (the commands and events are plain picklable data).
Whether to do that is to be decided by measurement (docs/ENGINE.md).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from services.common.errors import AlreadyExists, TensoryardError, Unavailable
from services.worker.engine.engine import EngineStats, LLMEngine, RequestOutput
from services.worker.engine.sampler import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    deadline_s: float | None = None


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: str
    error: TensoryardError


@dataclass(frozen=True, slots=True)
class EngineStopped:
    error: TensoryardError | None  # None: a clean shutdown


def _run_engine(engine: LLMEngine, inbox: queue.Queue, outbox: queue.Queue) -> None:
    """The engine side: read commands, step while there is work, publish events."""
    while True:
        commands = [inbox.get()] if not engine.has_unfinished() else []
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
                continue
            try:
                engine.add_request(
                    command.request_id, command.prompt_token_ids, command.params, command.priority, command.deadline_s
                )
            except TensoryardError as error:
                outbox.put(RequestFailed(command.request_id, error))
        if engine.has_unfinished():
            try:
                outputs = engine.step()
            except Exception as error:  # the engine's state is suspect now: fail everything and stop
                log.exception("engine step failed")
                outbox.put(EngineStopped(Unavailable(f"engine step failed: {type(error).__name__}: {error}")))
                return
            outbox.put(outputs)
        outbox.put(engine.stats())


class EngineLoop:
    """Owns an LLMEngine built by engine_factory inside its own thread."""

    def __init__(self, engine_factory: Callable[[], LLMEngine]):
        self._engine_factory = engine_factory
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._streams: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()  # guards _streams and _stopped against submit/dispatch races
        self._stopped: TensoryardError | None = Unavailable("engine loop is not started")
        self._stats: EngineStats | None = None
        self._engine_thread: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        """Builds the engine in its thread; raises what building raised."""
        built: queue.Queue = queue.Queue()

        def run() -> None:
            try:
                engine = self._engine_factory()
            except BaseException as error:  # handed to start(), which raises it
                built.put(error)
                return
            built.put(None)
            _run_engine(engine, self._inbox, self._outbox)

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
        self._inbox.put(AddRequest(request_id, list(prompt_token_ids), params, priority, deadline_s))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def stats(self) -> EngineStats | None:
        """The snapshot published after the latest step (None before the first)."""
        return self._stats

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Aborts what is in flight (each stream gets its "abort" output) and stops both threads."""
        self._inbox.put(Shutdown())
        for thread in (self._engine_thread, self._dispatch_thread):
            if thread is not None:
                thread.join(timeout_s)

    def _dispatch(self) -> None:
        while True:
            event = self._outbox.get()
            if isinstance(event, EngineStats):
                self._stats = event
            elif isinstance(event, list):
                for output in event:
                    self._deliver(output.request_id, output, output.finished)
            elif isinstance(event, RequestFailed):
                self._deliver(event.request_id, event.error, True)
            elif isinstance(event, EngineStopped):
                self._stop(event.error or Unavailable("engine loop is shut down"))
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
